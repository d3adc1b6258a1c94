"""Bit packing: re-exports :mod:`dit_quant_jax.numerics.packing` (the one packing routine; it
lives below quant/ and kernels/ so that both import it)."""

from dit_quant_jax.numerics.packing import (MAX_BITS, group_shape, index_bits,  # noqa: F401
                                            pack_bits, packed_length, unpack_bits)
