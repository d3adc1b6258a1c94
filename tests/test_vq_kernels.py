"""VQ matmul paths (kernels/vq_matmul.py) vs the plain-jnp reference and a float64 numpy decode.

Interpret mode on CPU (compiled on a GPU): fresh random inputs per case, block-multiple and
ragged shapes, every path the dispatcher can choose (vq_splitk with its in-launch split-K
reduction, vq_tiled, vq_dequant_dot), the DiT-XL/2 tile configs (128-wide tiles, 8 warps) on
small M, 2/3/6/8-bit indices and a d that is not a power of two (per-element decode).
"""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_quant_jax.kernels import common
from dit_quant_jax.kernels import dispatch
from dit_quant_jax.kernels import vq_matmul as vq
from dit_quant_jax.numerics import packing

INTERPRET = jax.default_backend() != "gpu"
BF16_REL_TOL = 1e-2  # bf16 operands (8-bit mantissa), float32 accumulation


def _rng(*key):
  return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _problem(m_rows, k_features, n_features, n_codewords, sub_dim, key):
  rng = _rng("vq", m_rows, k_features, n_features, n_codewords, sub_dim, key)
  x = jnp.asarray(rng.standard_normal((m_rows, k_features)), jnp.bfloat16)
  codebook = rng.standard_normal((n_codewords, sub_dim)).astype(np.float32)
  indices = rng.integers(0, n_codewords, (k_features // sub_dim, n_features))
  packed = jnp.asarray(packing.pack_bits(indices, packing.index_bits(n_codewords), axis=0))
  bias = rng.standard_normal(n_features).astype(np.float32)
  # float64 numpy: W[s * d + j, n] = codebook[index[s, n], j]
  dense = codebook.astype(np.float64)[indices].transpose(0, 2, 1).reshape(k_features, -1)
  expected = np.asarray(x, np.float64) @ dense + bias
  return x, jnp.asarray(codebook), packed, jnp.asarray(bias), expected


def _rel_max_error(y, expected):
  y = np.asarray(jnp.asarray(y, jnp.float32), np.float64)
  return np.max(np.abs(y - expected)) / np.max(np.abs(expected))


CASES = [  # m, k, n, codewords k, d, config
    # vq_splitk: K split 2 (+ a ragged last split), ragged M and N, 6-bit indices straddle bytes
    (37, 96, 48, 64, 4, dict(block_m=16, block_n=16, block_k=32, split_k=2)),
    # vq_splitk with more splits than... each split >= 1 tile; 8-bit indices; tiny M (adaLN)
    (5, 256, 80, 256, 4, dict(block_m=16, block_n=64, block_k=64, split_k=4)),
    # vq_tiled, block-multiple shapes, 8-bit indices, d = 2
    (32, 64, 32, 256, 2, dict(block_m=16, block_n=16, block_k=32, split_k=1)),
    # d = 3 (not a power of two): per-element decode, 3-bit indices
    (8, 96, 32, 8, 3, dict(block_m=16, block_n=16, block_k=32, split_k=1)),
    # 2-bit indices (k = 4), d = 1 (scalar quantization through the VQ path)
    (19, 64, 40, 4, 1, dict(block_m=16, block_n=32, block_k=32, split_k=2)),
    # DiT-XL/2 tile config of vq_tiled on a small ragged problem: 128 x 128 x 64, 8 warps
    (37, 192, 160, 256, 4, dict(block_m=128, block_n=128, block_k=64, split_k=1, num_warps=8)),
    # Hopper's tail-aware token-row config: 128 x 64 tiles, 4 warps, K split 3 ways (not a
    # power of two) reduced in the launch, ragged M, N and last K part
    (131, 320, 72, 256, 4, dict(block_m=128, block_n=64, block_k=64, split_k=3, num_warps=4)),
    # stream-K (Hopper's token-row tile, 128 x 128): 2 x 2 ragged tiles x 5 K tiles over 6
    # programs of 4 iterations: every tile in pieces, some programs span two tiles
    (131, 320, 160, 256, 4, dict(block_m=128, block_n=128, block_k=64, stream_k=6,
                                 num_warps=8)),
    # stream-K with more programs than iterations (clamped), 6-bit indices straddling bytes
    (37, 96, 48, 64, 4, dict(block_m=16, block_n=16, block_k=32, stream_k=64)),
    # stream-K after data-parallel waves, staged epilogue: 3 x 3 tiles on 4 programs (8 whole
    # in 2 waves, the last tile's 3 K tiles in shares of 1: one program's share is empty)
    (37, 96, 48, 64, 4, dict(block_m=16, block_n=16, block_k=32, stream_k=4, whole_waves=True,
                             staged_epilogue=True)),
]


@pytest.mark.parametrize("m_rows,k_features,n_features,n_codewords,sub_dim,config", CASES)
def test_vq_matmul_matches_reference(m_rows, k_features, n_features, n_codewords, sub_dim,
                                     config):
  x, codebook, packed, bias, expected = _problem(m_rows, k_features, n_features, n_codewords,
                                                 sub_dim, "kernel")
  y = vq.vq_matmul(x, codebook, packed, bias, interpret=INTERPRET, **config)
  assert y.shape == (m_rows, n_features) and y.dtype == jnp.bfloat16
  assert _rel_max_error(y, expected) < BF16_REL_TOL
  reference = vq.vq_matmul_reference(x, codebook, packed, bias)
  assert _rel_max_error(reference, expected) < BF16_REL_TOL


def test_vq_splitk_reduction_is_deterministic_and_writes_every_element():
  """The in-launch split-K fix-up: every output element written (no NaN from the poisoned
  bias trick below), and the same bits on a second call."""
  x, codebook, packed, bias, expected = _problem(21, 256, 96, 256, 4, "determinism")
  config = dict(block_m=16, block_n=32, block_k=32, split_k=8)
  first = vq.vq_matmul(x, codebook, packed, bias, interpret=INTERPRET, **config)
  second = vq.vq_matmul(x, codebook, packed, bias, interpret=INTERPRET, **config)
  np.testing.assert_array_equal(np.asarray(first), np.asarray(second))
  assert np.all(np.isfinite(np.asarray(first, np.float32)))
  assert _rel_max_error(first, expected) < BF16_REL_TOL
  no_bias = vq.vq_matmul(x, codebook, packed, None, interpret=INTERPRET, **config)
  assert _rel_max_error(no_bias, expected - np.asarray(bias)) < BF16_REL_TOL


@pytest.mark.parametrize("m_rows,n_features,k_tiles,block,programs", [
    (1024, 1152, 18, 128, 264),   # VQ / W4A16 proj at M = 1024 on an H100: 72 tiles
    (4096, 1152, 72, 128, 264),   # fc2 at M = 4096: 288 tiles, programs span 2-3 tiles
    (131, 160, 5, 128, 6), (40, 72, 5, 16, 7), (37, 48, 3, 16, 64), (512, 512, 4, 128, 1)])
@pytest.mark.parametrize("whole_waves", [False, True])
def test_stream_k_schedule_covers_every_iteration_once(m_rows, n_features, k_tiles, block,
                                                       programs, whole_waves):
  schedule = common.stream_k_schedule(m_rows, n_features, k_tiles, block_m=block,
                                      block_n=block, programs=programs,
                                      data_parallel=whole_waves)
  tiles = -(-m_rows // block) * -(-n_features // block)
  assert schedule.tiles == tiles and schedule.programs <= programs
  if whole_waves:  # whole waves of `programs` tiles, as many as fit
    assert schedule.whole_tiles == tiles // programs * programs
  else:
    assert schedule.whole_tiles == 0
  seen = np.zeros((tiles, k_tiles), np.int64)
  per_program = {}
  for program, tile, first, end in schedule.pieces():
    assert 0 <= first < end <= k_tiles
    seen[tile, first:end] += 1
    per_program.setdefault(program, []).append((tile, first, end))
  np.testing.assert_array_equal(seen, 1)
  if not schedule.whole_tiles:
    assert sorted(per_program) == list(range(schedule.programs))  # none empty
  for program, pieces in per_program.items():
    whole = [tile for tile, _, _ in pieces if tile < schedule.whole_tiles]
    assert whole == list(range(program, schedule.whole_tiles, schedule.programs))
    pieces = pieces[len(whole):]
    work = sum(end - first for _, first, end in pieces)
    assert (work == schedule.per_program or program == schedule.programs - 1
            or (schedule.whole_tiles and work < schedule.per_program))
    # only a program's first and last tile can be pieces: its two partial slots suffice
    assert all((first, end) == (0, k_tiles) for _, first, end in pieces[1:-1])
  partial = sum(1 for _, _, first, end in schedule.pieces() if (first, end) != (0, k_tiles))
  assert schedule.partial_pieces() == partial
  assert schedule.partial_pieces(staged=True) == len(schedule.pieces())
  if (m_rows, n_features, programs, whole_waves) == (4096, 1152, 264, True):
    # 288 tiles: one wave of 264, then 24 tiles' 1728 K tiles in shares of 7
    assert (schedule.whole_tiles, schedule.per_program) == (264, 7)
  if (m_rows, n_features, programs, whole_waves) == (1024, 1152, 264, False):
    # 1296 iterations: shares of 5 (ceil(1296 / 264)) need 260 programs
    assert (schedule.per_program, schedule.programs) == (5, 260)


def test_stream_k_fixup_is_deterministic_and_writes_every_element():
  """Tiles in two to four pieces, the last arriving program summing them 32 columns at a time
  (ragged N: the last chunk partly masked): the same bits on a second call, no element left
  unwritten (NaN-free), within bf16 of the float64 product; bad stream_k values are refused."""
  x, codebook, packed, bias, expected = _problem(150, 512, 200, 256, 4, "stream-k")
  config = dict(block_m=128, block_n=128, block_k=64, stream_k=9, num_warps=8)
  first = vq.vq_matmul(x, codebook, packed, bias, interpret=INTERPRET, **config)
  second = vq.vq_matmul(x, codebook, packed, bias, interpret=INTERPRET, **config)
  np.testing.assert_array_equal(np.asarray(first), np.asarray(second))
  assert np.all(np.isfinite(np.asarray(first, np.float32)))
  assert _rel_max_error(first, expected) < BF16_REL_TOL
  with pytest.raises(ValueError, match="split_k=1"):
    vq.vq_matmul(x, codebook, packed, bias, interpret=INTERPRET, **dict(config, split_k=2))
  with pytest.raises(ValueError, match="stream_k must be"):
    vq.vq_matmul(x, codebook, packed, bias, interpret=INTERPRET, **dict(config, stream_k=-1))
  with pytest.raises(ValueError, match="stream-K launch only"):
    vq.vq_matmul(x, codebook, packed, bias, interpret=INTERPRET,
                 **dict(config, stream_k=0, staged_epilogue=True))
  # the staged epilogue (every tile through the slots) computes the same function
  staged = vq.vq_matmul(x, codebook, packed, bias, interpret=INTERPRET,
                        **dict(config, staged_epilogue=True))
  np.testing.assert_array_equal(np.asarray(staged), np.asarray(first))


def test_vq_dequant_dot_matches_reference():
  x, codebook, packed, bias, expected = _problem(40, 128, 72, 64, 2, "dequant_dot")
  y = vq.vq_dequant_dot(x, codebook, packed, bias)
  assert y.dtype == x.dtype
  assert _rel_max_error(y, expected) < BF16_REL_TOL
  dense = vq.vq_dequantize(codebook, packed, 128, jnp.float32)
  np.testing.assert_allclose(dense, vq.vq_dequantize_reference(codebook, packed, 128))


@pytest.mark.parametrize("m_rows", [4, 100, 600])
def test_vq_linear_runs_the_dispatched_path(m_rows):
  """vq_linear with impl="pallas" takes the dispatcher's path (split-K / tiled / dequant-dot
  by M) and flattens leading dims."""
  k_features, n_features = 128, 96
  x2d, codebook, packed, bias, expected = _problem(m_rows, k_features, n_features, 256, 4,
                                                   "linear")
  x = x2d.reshape((m_rows // 2, 2, k_features)) if m_rows % 2 == 0 else x2d
  y = vq.vq_linear(x, codebook, packed, bias, impl="pallas")
  assert y.shape == x.shape[:-1] + (n_features,)
  assert _rel_max_error(y.reshape(m_rows, n_features), expected) < BF16_REL_TOL
  path = dispatch.choose("vq", m_rows, k_features, n_features).path
  assert path == {4: "vq_splitk", 100: "vq_tiled", 600: "vq_dequant_dot"}[m_rows]
  reference = vq.vq_linear(x, codebook, packed, bias, impl="reference")
  assert _rel_max_error(reference.reshape(m_rows, n_features), expected) < BF16_REL_TOL


def test_vq_linear_forced_path_and_reference_default_on_cpu():
  x, codebook, packed, bias, expected = _problem(8, 64, 32, 16, 4, "forced")
  y = vq.vq_linear(x, codebook, packed, bias, impl="pallas", path="vq_tiled", block_m=16,
                   block_n=16, block_k=32)
  assert _rel_max_error(y, expected) < BF16_REL_TOL
  if INTERPRET:
    assert common.resolve_impl("auto") == (False, True)  # CPU default: the reference
  with pytest.raises(ValueError, match="unknown VQ path"):
    vq.run_path("vq_bogus", x, codebook, packed, bias, {}, True)


def test_vq_rejects_bad_layout():
  codebook = jnp.ones((64, 4))
  x = jnp.ones((4, 96))
  with pytest.raises(ValueError, match="packed assignments"):
    vq.vq_matmul(x, codebook, jnp.zeros((10, 8), jnp.uint8), interpret=True)
  with pytest.raises(ValueError, match="multiple of the sub-vector length"):
    vq.vq_matmul(jnp.ones((4, 98)), codebook, jnp.zeros((18, 8), jnp.uint8), interpret=True)
  with pytest.raises(ValueError, match="power of two"):
    vq.vq_matmul(x, codebook, jnp.zeros((18, 8), jnp.uint8), block_k=24, interpret=True)
  with pytest.raises(ValueError, match="split_k"):
    vq.vq_matmul(x, codebook, jnp.zeros((18, 8), jnp.uint8), split_k=0, interpret=True)
