"""Benchmarks that measure dtrain against PyTorch's own implementation of the same technique, in the same
run, on the same model and data (`python -m dtrain.bench.<name> --help`)."""
