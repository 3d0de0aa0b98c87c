"""Benchmarks that measure dtrain against PyTorch's own implementation of the same technique, in the same
run, on the same model and data (`python -m dtrain.bench.<name> --help`).

One module per technique holds our side, PyTorch's peer and the checks and report of that technique:
zero (DDP, ZeroRedundancyOptimizer, FSDP2), tensor_parallel (DTensor), pipeline
(torch.distributed.pipelining) and moe (PyTorch having no expert parallelism, an all-gather dispatcher it
writes itself). They share harness (the command line, the spawned Gloo world, the alternating timed steps,
tables, CSV, plots, TensorBoard) and comm (the collectives a step issues, in bytes sent per rank).
step_time runs every pair on one model; collectives times each form of data parallelism's and ZeRO's
collectives over Gloo.

scaling (`dtrain bench`) measures dtrain alone: throughput, memory and bytes sent per rank across world
sizes and layouts, strong and weak scaling, one fresh world per point. gpu measures it alone on one GPU:
tokens/s, MFU and peak memory of the 1B preset per ZeRO stage, offload and compile setting, beside
`dtrain estimate`'s peak."""
