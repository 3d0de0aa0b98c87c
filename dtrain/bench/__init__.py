"""Benchmarks that measure dtrain against PyTorch's own implementation of the same technique, in the same
run, on the same model and data (`python -m dtrain.bench.<name> --help`).

One module per benchmark (tensor_parallel, pipeline, zero, moe: what it measures and how, in its
docstring), with its PyTorch side (`<name>_pytorch`; moe compares against an all-gather dispatcher it
writes itself, PyTorch having no expert parallelism) and its report (`<name>_report`) beside it; what
they share:
world (the spawned Gloo world), timing (barriers, alternation, slowest rank), comm (counting
collectives), cli (the common flags) and report (printing the table, writing the CSV).

scaling (`dtrain bench`) measures dtrain alone: throughput, memory and bytes sent per rank across world
sizes and layouts, strong and weak scaling, one fresh world per point; scaling_report writes its CSV,
PNG plots and TensorBoard scalars."""
