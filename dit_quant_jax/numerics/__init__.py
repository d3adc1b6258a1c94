"""Shared numerics below quant/ and kernels/: number-format code tables and bit packing."""
