"""Benchmark and static-analysis library: device-side timing (kernels.py), roofline estimates
(roofline.py), Triton lowering + PTX reading without a GPU (triton_ptx.py)."""
