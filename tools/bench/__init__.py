"""The GPU benchmarks by subject, run by tools/benchmarks.py: single kernels (kernels.py), the whole model
(model.py), runner runs on a machine's GPUs (runs.py) and the memory plan against measured peaks (memory.py)."""
