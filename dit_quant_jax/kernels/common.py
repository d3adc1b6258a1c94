"""Pieces shared by the Pallas kernels: backend dispatch, block-size checks, in-kernel decoding.

The kernels target the Pallas Triton lowering (NVIDIA A100/H100).  Rules they follow, checked
here where possible:

* every array a kernel builds has power-of-two dimensions (Triton's ``make_range`` / tensor
  shapes), and every ``jnp.dot`` operand is at least 16 x 16 (``tl.dot``);
* operands are whole arrays in global memory (no BlockSpecs); a program computes its tile
  offsets from ``pl.program_id`` and loads with ``plgpu.load(ref.at[...], mask=..., other=...)``,
  so ragged edges are masked rather than padded and nothing is copied before a call;
* packed codes are decoded per tile by *gather loads*: a load whose index is an integer array
  becomes a tensor of pointers in Triton, which is how a tile reads the bytes holding its codes
  and then the codebook / lookup-table entries those codes name.  The same loads run in
  interpret mode on CPU (``interpret=True``), which is how the tests exercise the kernels.

Dispatch: each op has a ``*_linear`` / top-level function taking ``impl`` in
``{"auto", "pallas", "reference"}``.  ``"auto"`` (the default) runs the Pallas kernel when
``jax.default_backend() == "gpu"`` and the plain-jnp reference otherwise; ``"pallas"`` forces the
kernel (in interpret mode off GPU).  :func:`kernel_impl` changes the default for a block of code
(e.g. to push a whole model through the interpret-mode kernels in a test).
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

IMPLS = ("auto", "pallas", "reference")
MIN_BLOCK = 16  # smallest tl.dot operand dimension (Triton MMA tiles)

_default_impl = ["auto"]


@contextlib.contextmanager
def kernel_impl(impl: str):
  """Within the block, ``impl="auto"`` dispatchers resolve to ``impl`` (read at trace time)."""
  _check_impl(impl)
  previous = _default_impl[0]
  _default_impl[0] = impl
  try:
    yield
  finally:
    _default_impl[0] = previous


def _check_impl(impl: str) -> None:
  if impl not in IMPLS:
    raise ValueError(f"unknown kernel impl {impl!r}; expected one of {IMPLS}")


# A GPU the kernels are traced for instead of the local backend (target_gpu); None: local.
_target_device_kind = [None]


@contextlib.contextmanager
def target_gpu(device_kind: str = "NVIDIA H100 80GB HBM3"):
  """Within the block, trace as on a GPU of this ``device_kind`` whatever the local backend:
  ``impl="auto"`` is the compiled Pallas kernels (no interpret mode) and the dispatch table
  reads that device's rows.  For exporting a model for an abstract GPU on a CPU machine
  (bench/triton_ptx.export_for_gpu): lowering only; a function traced inside cannot run here."""
  previous = _target_device_kind[0]
  _target_device_kind[0] = device_kind
  try:
    yield
  finally:
    _target_device_kind[0] = previous


def on_gpu() -> bool:
  return _target_device_kind[0] is not None or jax.default_backend() == "gpu"


def local_device_kind() -> tuple[str, str]:
  """(platform, device_kind) the kernels are traced for: target_gpu's, else the first local
  device's."""
  if _target_device_kind[0] is not None:
    return "gpu", _target_device_kind[0]
  device = jax.devices()[0]
  return device.platform, device.device_kind


def resolve_impl(impl: str) -> tuple[bool, bool]:
  """impl -> (use_pallas, interpret)."""
  _check_impl(impl)
  if impl == "auto":
    impl = _default_impl[0]
  if impl == "auto":
    impl = "pallas" if on_gpu() else "reference"
  return impl == "pallas", not on_gpu()


def compiler_params(num_warps: int, num_stages: int):
  """Triton compiler parameters (``plgpu.CompilerParams`` in jax >= 0.7)."""
  params_cls = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
  return params_cls(num_warps=num_warps, num_stages=num_stages)


def check_block(name: str, size: int, minimum: int = MIN_BLOCK) -> None:
  if not isinstance(size, int) or size < minimum or size & (size - 1):
    raise ValueError(f"{name} must be a power of two >= {minimum} (Triton tile), got {size!r}")


def block_size_for(extent: int, lo: int, hi: int) -> int:
  """The power of two in [lo, hi] closest above ``extent`` (lo, hi powers of two)."""
  return int(min(hi, max(lo, pl.next_power_of_2(max(int(extent), 1)))))


# Programs that keep an H100 (132 SMs) / A100 (108 SMs) busy: about two per SM.
TARGET_PROGRAMS = 256
MAX_SPLIT_K = 8


def default_matmul_blocks(m: int, n: int, k: int, min_block_k: int = 32) -> dict:
  """Heuristic tile sizes and launch parameters for an (m, k) x (k, n) kernel.

  Small m (adaLN rows, small batches) gets a thin row tile, narrower columns and a K split so
  that enough programs run to stream the weight at full bandwidth; the reduction tile stays at
  64 so the decoded weight tile (block_k x block_n) stays in registers.  Tuned only by
  reasoning; the benchmark's ``--sweep`` times alternatives on a GPU.
  """
  block_m = block_size_for(m, 16, 128)
  block_n = block_size_for(n, 16, 64 if m <= 64 else 128)
  block_k = block_size_for(k, min_block_k, 64)
  num_warps = 4 if block_m * block_n <= 64 * 64 else 8
  programs = pl.cdiv(m, block_m) * pl.cdiv(n, block_n)
  k_tiles = pl.cdiv(k, block_k)
  split_k = 1
  while (2 * split_k <= MAX_SPLIT_K and 2 * split_k * programs <= TARGET_PROGRAMS
         and 4 * split_k <= k_tiles):
    split_k *= 2
  return dict(block_m=block_m, block_n=block_n, block_k=block_k, num_warps=num_warps,
              num_stages=3, split_k=split_k)


def flatten_rows(x: jax.Array, features: int, name: str = "x") -> tuple[jax.Array, tuple]:
  """x: (..., features) -> ((rows, features), leading shape)."""
  if x.ndim < 1 or x.shape[-1] != features:
    raise ValueError(f"{name} must have shape (..., {features}), got {x.shape}")
  lead = x.shape[:-1]
  return x.reshape((math.prod(lead), features)), lead


def launch_matmul(kernel, operands, *, m_rows: int, n_features: int, out_dtype, acc_dtype,
                  block_m: int, block_n: int, split_k: int, num_warps: int, num_stages: int,
                  interpret: bool, name: str, epilogue):
  """pallas_call of a tiled matmul kernel, with an optional split of the K loop.

  split_k == 1: grid (M tiles, N tiles); the kernel applies its epilogue and writes (M, N).
  split_k > 1: grid (M tiles, N tiles, split_k); program (i, j, s) reduces its share of the K
  tiles and writes the raw accumulator (acc_dtype) at rows ``s * M + ...`` of a (split_k * M, N)
  buffer; the partials are summed here (exact for int32) and ``epilogue(acc)`` (plain jnp, the
  same per-row / per-column scaling and bias the kernel applies) finishes the output.
  """
  common_args = dict(compiler_params=compiler_params(num_warps, num_stages), interpret=interpret,
                     name=name)
  grid = (pl.cdiv(m_rows, block_m), pl.cdiv(n_features, block_n))
  if split_k == 1:
    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((m_rows, n_features), out_dtype),
                          grid=grid, **common_args)(*operands)
  partials = pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((split_k * m_rows, n_features), acc_dtype),
      grid=grid + (split_k,), **common_args)(*operands)
  acc = jnp.sum(partials.reshape(split_k, m_rows, n_features), axis=0, dtype=acc_dtype)
  return epilogue(acc).astype(out_dtype)


def launch_matmul_reduced_in_kernel(kernel, operands, *, m_rows: int, n_features: int,
                                    out_dtype, block_m: int, block_n: int, split_k: int,
                                    num_warps: int, num_stages: int, interpret: bool, name: str,
                                    partial_dtype=jnp.float32):
  """pallas_call of a tiled matmul kernel whose K split is reduced inside the same launch.

  split_k == 1: grid (M tiles, N tiles), kernel(*operands, out_ref).
  split_k > 1: grid (M tiles, N tiles, split_k); kernel(*operands, counter_in, out_ref,
  partials_ref, counter_ref) where counter (M tiles * N tiles,) int32 starts at zero (aliased in
  and out) and partials (split_k * M, N) partial_dtype (float32, or int32 for an integer
  accumulator: summed exactly) is scratch; the kernel ends with
  :func:`finish_tile_reduced_in_kernel` (its refs: :func:`reduced_output_refs`).  Returns the
  (M, N) output.
  """
  common_args = dict(compiler_params=compiler_params(num_warps, num_stages), interpret=interpret,
                     name=name)
  grid = (pl.cdiv(m_rows, block_m), pl.cdiv(n_features, block_n))
  out_shape = jax.ShapeDtypeStruct((m_rows, n_features), out_dtype)
  if split_k == 1:
    return pl.pallas_call(kernel, out_shape=out_shape, grid=grid, **common_args)(*operands)
  counters = jnp.zeros((grid[0] * grid[1],), jnp.int32)
  out, _, _ = pl.pallas_call(
      kernel, grid=grid + (split_k,),
      out_shape=(out_shape,
                 jax.ShapeDtypeStruct((split_k * m_rows, n_features), partial_dtype),
                 jax.ShapeDtypeStruct(counters.shape, jnp.int32)),
      input_output_aliases={len(operands): 2}, **common_args)(*operands, counters)
  return out


class ReducedOutputRefs(NamedTuple):
  """The output refs of a kernel launched by :func:`launch_matmul_reduced_in_kernel`."""
  out: object
  partials: object = None
  counter: object = None


def reduced_output_refs(refs, split_k: int) -> ReducedOutputRefs:
  """The kernel's trailing refs: (out_ref,) without a split; (counter_in, out_ref, partials_ref,
  counter_ref) with one (the aliased counter input is not used)."""
  if split_k == 1:
    (out_ref,) = refs
    return ReducedOutputRefs(out_ref)
  _, out_ref, partials_ref, counter_ref = refs
  return ReducedOutputRefs(out_ref, partials_ref, counter_ref)


def finish_tile_reduced_in_kernel(acc, epilogue, outputs: ReducedOutputRefs, *, split_k: int,
                                  m_rows: int, row_start, col_start, row_mask, col_mask,
                                  interpret: bool) -> None:
  """End of a program of a launch_matmul_reduced_in_kernel kernel: without a split, store
  ``epilogue(acc)``; with one, write the partial, count in, and let the last program of the
  output tile sum all partials (in split order: deterministic; int32 partials exactly) and
  store ``epilogue(sum)``.

  Ordering: a CTA barrier puts every thread's partial store before the (acquire-release, GPU
  scope) atomic; the last program's loads come after its atomic, the
  pattern of a semaphore-guarded split-K fix-up (the GPU-scope acquire invalidates stale L1
  lines; output tiles never overlap, so no other program read these lines in this launch).
  Interpret mode runs programs one at a time, so there the barrier is not needed.
  """
  out_ref, partials_ref, counter_ref = outputs
  if split_k == 1:
    store_tile(out_ref, epilogue(acc), row_start, col_start, row_mask, col_mask)
    return
  store_tile(partials_ref, acc, pl.program_id(2) * m_rows + row_start, col_start, row_mask,
             col_mask)
  if not interpret:
    plgpu.debug_barrier()
  tile = pl.program_id(0) * pl.num_programs(1) + pl.program_id(1)
  arrived = plgpu.atomic_add(counter_ref, tile, np.int32(1))

  @pl.when(arrived == split_k - 1)
  def _last_program_reduces():
    rows, cols = acc.shape
    mask = row_mask[:, None] & col_mask[None, :]
    total = jnp.zeros(acc.shape, partials_ref.dtype)
    zero = np.zeros((), np.dtype(partials_ref.dtype))
    for split in range(split_k):
      total = total + plgpu.load(
          partials_ref.at[pl.ds(split * m_rows + row_start, rows), pl.ds(col_start, cols)],
          mask=mask, other=zero)
    store_tile(out_ref, epilogue(total), row_start, col_start, row_mask, col_mask)


# ----------------------------------------------------------------------------------------
# Stream-K: a fixed number of programs share the launch's K iterations evenly.
# ----------------------------------------------------------------------------------------


class Tile(NamedTuple):
  """One output tile's (or column chunk's) offsets and masks, as the epilogues read them."""
  row_start: object
  col_start: object
  row_mask: object
  col_mask: object


def tile_at(tile_row, tile_col, *, block_m: int, block_n: int, m_rows: int,
            n_features: int) -> Tile:
  row_start = tile_row * block_m
  col_start = tile_col * block_n
  return Tile(row_start, col_start,
              row_start + jnp.arange(block_m, dtype=jnp.int32) < m_rows,
              col_start + jnp.arange(block_n, dtype=jnp.int32) < n_features)


class StreamKSchedule(NamedTuple):
  """Static stream-K schedule over (tiles_m x tiles_n) output tiles (row-major) of k_tiles K
  tiles each.  The first ``whole_tiles`` tiles (a multiple of ``programs``) run data-parallel:
  program p finishes tiles p, p + programs, ... whole.  The rest form the stream-K iteration
  space (tile-major: its tile t owns iterations [t k_tiles, (t + 1) k_tiles)), which program p
  walks from p x per_program on (the last share may be shorter; with whole_tiles 0 none is
  empty)."""
  tiles_m: int
  tiles_n: int
  k_tiles: int
  programs: int
  per_program: int
  whole_tiles: int = 0

  @property
  def tiles(self) -> int:
    return self.tiles_m * self.tiles_n

  @property
  def iterations(self) -> int:
    """Iterations of the stream-K part."""
    return (self.tiles - self.whole_tiles) * self.k_tiles

  def pieces(self) -> list:
    """[(program, tile, first K tile, end K tile)] in program order: what each program runs."""
    out = []
    for program in range(self.programs):
      for tile in range(program, self.whole_tiles, self.programs):
        out.append((program, tile, 0, self.k_tiles))
      start = program * self.per_program
      end = min(start + self.per_program, self.iterations)
      if end <= start:
        continue
      for tile in range(start // self.k_tiles, (end - 1) // self.k_tiles + 1):
        out.append((program, self.whole_tiles + tile, max(start - tile * self.k_tiles, 0),
                    min(end - tile * self.k_tiles, self.k_tiles)))
    return out

  def partial_pieces(self, staged: bool = False) -> int:
    """Pieces that are not a whole tile: each writes a float32 partial that the tile's last
    program reads back (``staged``: every piece, whole tiles included: run_stream_k)."""
    return sum(1 for _, _, lo, hi in self.pieces() if staged or (lo, hi) != (0, self.k_tiles))


def stream_k_schedule(m_rows: int, n_features: int, k_tiles: int, *, block_m: int,
                      block_n: int, programs: int,
                      data_parallel: bool = False) -> StreamKSchedule:
  """Even shares of the launch's K iterations for up to ``programs`` programs (fewer where
  the shares round up: 1296 iterations over 264 programs take 5 each, 260 programs).
  data_parallel: whole waves of ``programs`` tiles first (each program finishes one tile per
  wave, no partials), stream-K for the remaining tiles only (288 tiles on 264 programs: one
  wave, then 24 tiles' 432 iterations in shares of 2)."""
  if not isinstance(programs, int) or programs < 1:
    raise ValueError(f"stream_k (programs) must be a positive integer, got {programs!r}")
  tiles_m, tiles_n = pl.cdiv(m_rows, block_m), pl.cdiv(n_features, block_n)
  tiles = tiles_m * tiles_n
  whole = tiles // programs * programs if data_parallel else 0
  iterations = (tiles - whole) * int(k_tiles)
  if whole:
    return StreamKSchedule(tiles_m, tiles_n, int(k_tiles), programs,
                           -(-iterations // programs), whole)
  per_program = -(-iterations // programs)
  return StreamKSchedule(tiles_m, tiles_n, int(k_tiles), -(-iterations // per_program),
                         per_program)


# Columns per chunk of the stream-K fix-up: the last program of a tile sums the partials and
# runs the epilogue 32 columns at a time, so a (128, 32) float32 sum and one loaded partial are
# live (16 + 16 registers per thread at 8 warps) instead of two whole (128, 128) tiles (64 + 64,
# which pushed 128 x 128 tiles past the 128 registers of 2 CTAs per SM).
FIXUP_CHUNK = 32


def launch_matmul_stream_k(kernel, operands, *, schedule: StreamKSchedule, m_rows: int,
                           n_features: int, out_dtype, block_m: int, block_n: int,
                           num_warps: int, num_stages: int, interpret: bool, name: str,
                           partial_dtype=jnp.float32):
  """pallas_call of a stream-K matmul kernel: grid (schedule.programs,), kernel(*operands,
  counter_in, out_ref, partials_ref, counter_ref) with counter (tiles,) int32 zeros (aliased
  in and out), partials (2 programs x block_m, block_n) partial_dtype scratch (two slots per
  program: the tile it starts in and the tile it ends in); the kernel runs
  :func:`run_stream_k`.  Returns the (M, N) output."""
  counters = jnp.zeros((schedule.tiles,), jnp.int32)
  out, _, _ = pl.pallas_call(
      kernel, grid=(schedule.programs,),
      out_shape=(jax.ShapeDtypeStruct((m_rows, n_features), out_dtype),
                 jax.ShapeDtypeStruct((2 * schedule.programs * block_m, block_n),
                                      partial_dtype),
                 jax.ShapeDtypeStruct(counters.shape, jnp.int32)),
      input_output_aliases={len(operands): 2},
      compiler_params=compiler_params(num_warps, num_stages), interpret=interpret,
      name=name)(*operands, counters)
  return out


def run_stream_k(schedule: StreamKSchedule, compute, epilogue, refs, *, block_m: int,
                 block_n: int, m_rows: int, n_features: int, interpret: bool,
                 staged: bool = False) -> None:
  """Body of a stream-K program (grid (schedule.programs,)).

  The program first finishes its data-parallel tiles whole (schedule.whole_tiles), then walks
  the stream-K tiles its iterations touch.  Per tile, ``compute(tile, first, end)`` returns
  the accumulator over K tiles [first, end).  A whole tile is finished at once:
  ``epilogue(acc, tile)`` stored.  A piece of a tile writes its partial to its slot (2 per
  program: 0 for the tile it starts in, 1 for the one it ends in), counts in with an atomic,
  and the tile's last program to arrive sums every piece's partial in program order
  (deterministic; int32 exactly) and stores ``epilogue(sum, chunk)`` FIXUP_CHUNK columns at a
  time.  ``staged``: whole tiles take the same road (their program's slot, then the chunked
  epilogue), so no code holds the whole accumulator beside the epilogue's vectors: W4A16's
  128 x 128 tile then takes 126 registers on sm_90a instead of 184 (2 CTAs per SM, not 1).  A
  whole tile's slot is one its program writes again later, after a barrier.  Ordering as
  :func:`finish_tile_reduced_in_kernel`.

  refs: (counter_in, out_ref, partials_ref, counter_ref) (launch_matmul_stream_k)."""
  _, out_ref, partials_ref, counter_ref = refs
  k_tiles, per_program = schedule.k_tiles, schedule.per_program
  whole_tiles = schedule.whole_tiles
  program = pl.program_id(0)
  chunk = min(block_n, FIXUP_CHUNK)

  def barrier():
    if not interpret:  # interpret mode runs one program's threads as one
      plgpu.debug_barrier()

  def tile_of(tile_index):
    tile_row = lax.div(tile_index, np.int32(schedule.tiles_n))
    return tile_at(tile_row, tile_index - tile_row * schedule.tiles_n, block_m=block_m,
                   block_n=block_n, m_rows=m_rows, n_features=n_features)

  def store_slot(slot, acc):
    plgpu.store(partials_ref.at[pl.ds(slot * block_m, block_m), pl.ds(0, block_n)],
                acc.astype(partials_ref.dtype))
    barrier()

  def finish_from_slots(tile, slot_of, first_program, last_program):
    """Sum the slots of programs [first, last] and store the epilogue, chunk by chunk."""
    for c in range(block_n // chunk):

      def add(piece_program, total, c=c):
        slot = slot_of(piece_program)
        return total + plgpu.load(
            partials_ref.at[pl.ds(slot * block_m, block_m), pl.ds(c * chunk, chunk)])

      total = lax.fori_loop(first_program, last_program + 1, add,
                            jnp.zeros((block_m, chunk), partials_ref.dtype))
      part = Tile(tile.row_start, tile.col_start + c * chunk, tile.row_mask,
                  tile.col_start + c * chunk + jnp.arange(chunk, dtype=jnp.int32) < n_features)
      store_tile(out_ref, epilogue(total, part), part.row_start, part.col_start,
                 part.row_mask, part.col_mask)

  def store_whole(acc, tile):
    store_tile(out_ref, epilogue(acc, tile), tile.row_start, tile.col_start, tile.row_mask,
               tile.col_mask)

  if whole_tiles:  # the data-parallel waves: tile program + w x programs, whole

    def wave(w, carry):
      tile = tile_of(program + w * schedule.programs)
      acc = compute(tile, 0, k_tiles)
      if staged:
        store_slot(2 * program, acc)
        finish_from_slots(tile, lambda q: 2 * q, program, program)
        barrier()  # read before the program's next tile overwrites the slot
      else:
        store_whole(acc, tile)
      return carry

    lax.fori_loop(0, whole_tiles // schedule.programs, wave, np.int32(0))
  if not schedule.iterations:
    return
  start = program * per_program
  end = jnp.minimum(start + per_program, schedule.iterations)
  first_tile = lax.div(start, np.int32(k_tiles))
  # an empty share (start >= end: a data-parallel schedule's spare programs) runs no tile
  stop_tile = jnp.where(end > start, lax.div(end - 1, np.int32(k_tiles)) + 1, first_tile)

  def tile_body(stream_tile, carry):
    tile_index = whole_tiles + stream_tile
    tile = tile_of(tile_index)
    tile_first = stream_tile * k_tiles
    first = jnp.maximum(start - tile_first, 0)
    stop = jnp.minimum(end - tile_first, k_tiles)
    acc = compute(tile, first, stop)

    def slot_of(piece_program):
      starts_elsewhere = lax.div(piece_program * per_program, np.int32(k_tiles)) != stream_tile
      return 2 * piece_program + starts_elsewhere.astype(jnp.int32)

    def through_slots():
      store_slot(slot_of(program), acc)
      arrived = plgpu.atomic_add(counter_ref, tile_index, np.int32(1))
      first_program = lax.div(tile_first, np.int32(per_program))
      last_program = lax.div(tile_first + k_tiles - 1, np.int32(per_program))

      @pl.when(arrived == last_program - first_program)
      def _last_piece_reduces():
        finish_from_slots(tile, slot_of, first_program, last_program)

    if staged:  # every tile through its slot (a whole one: its only piece)
      # (under a condition that always holds: interpret mode cannot discharge the atomic in a
      # loop body outside one)
      pl.when(stop > first)(through_slots)
      barrier()  # a whole tile's slot is read before the program writes it again
      return carry
    whole = (first == 0) & (stop == k_tiles)
    pl.when(whole)(lambda: store_whole(acc, tile))
    pl.when(jnp.logical_not(whole))(through_slots)
    return carry

  lax.fori_loop(first_tile, stop_tile, tile_body, np.int32(0))


def run_matmul_program(compute, epilogue, refs, *, block_m: int, block_n: int, block_k: int,
                       m_rows: int, k_features: int, n_features: int, split_k: int,
                       stream_k: StreamKSchedule | None, staged: bool, interpret: bool) -> None:
  """The body of a program of a tiled matmul kernel, from its per-tile parts:
  ``compute(tile, first, end)`` (the accumulator over K tiles [first, end)) and
  ``epilogue(acc, tile)`` (scales, bias, activation on a tile or a column chunk of one).
  stream_k: a stream-K program (:func:`run_stream_k`); otherwise the program's (block_m,
  block_n) tile of the grid and its K split, finished by :func:`finish_tile_reduced_in_kernel`
  (refs: launch_matmul_stream_k's or launch_matmul_reduced_in_kernel's output refs)."""
  if stream_k is not None:
    run_stream_k(stream_k, compute, epilogue, refs, block_m=block_m, block_n=block_n,
                 m_rows=m_rows, n_features=n_features, interpret=interpret, staged=staged)
    return
  outputs = reduced_output_refs(refs, split_k)
  tile = tile_at(pl.program_id(0), pl.program_id(1), block_m=block_m, block_n=block_n,
                 m_rows=m_rows, n_features=n_features)
  first, end = k_tile_range(k_features, block_k, split_k)
  finish_tile_reduced_in_kernel(
      compute(tile, first, end), lambda acc: epilogue(acc, tile), outputs, split_k=split_k,
      m_rows=m_rows, row_start=tile.row_start, col_start=tile.col_start,
      row_mask=tile.row_mask, col_mask=tile.col_mask, interpret=interpret)


def split_replaces_stream_k(config: dict, asked: dict) -> dict:
  """config with a caller's overrides ``asked`` applied; a K split asked for without naming
  stream_k replaces the dispatcher's stream-K launch (stream_k, whole_waves, staged_epilogue
  off)."""
  out = dict(config, **asked)
  if asked.get("split_k", 1) > 1 and "stream_k" not in asked:
    out.update(stream_k=0, whole_waves=False, staged_epilogue=False)
  return out


def check_split_k(split_k: int) -> None:
  if not isinstance(split_k, int) or split_k < 1:
    raise ValueError(f"split_k must be a positive integer, got {split_k!r}")


def check_stream_k(stream_k: int, split_k: int, staged: bool = False) -> None:
  if staged and not stream_k:
    raise ValueError("staged_epilogue applies to a stream-K launch only; pass stream_k > 0")
  if not isinstance(stream_k, int) or stream_k < 0:
    raise ValueError(f"stream_k must be 0 (tiled grid) or a number of programs, got "
                     f"{stream_k!r}")
  if stream_k and split_k != 1:
    raise ValueError(f"stream_k={stream_k} shares the K loop itself; pass split_k=1 "
                     f"(got {split_k})")


# ----------------------------------------------------------------------------------------
# In-kernel helpers (called inside kernels on refs; traced into Triton IR or interpreted).
# ----------------------------------------------------------------------------------------


def k_tile_range(k_features: int, block_k: int, split_k: int):
  """(first, end) K tiles of this program: all of them, or its share along grid axis 2."""
  n_tiles = pl.cdiv(k_features, block_k)
  if split_k == 1:
    return 0, n_tiles
  per_split = pl.cdiv(n_tiles, split_k)
  first = pl.program_id(2) * per_split
  return first, jnp.minimum(first + per_split, n_tiles)


def finish_tile(out_ref, acc, epilogue, *, split_k: int, m_rows: int, row_start, col_start,
                row_mask, col_mask) -> None:
  """Store a finished tile (epilogue applied) or, with split_k > 1, the raw partial."""
  if split_k == 1:
    store_tile(out_ref, epilogue(acc), row_start, col_start, row_mask, col_mask)
  else:
    store_tile(out_ref, acc, pl.program_id(2) * m_rows + row_start, col_start, row_mask,
               col_mask)


def load_tile(ref, row_start, rows: int, col_start, cols: int, row_mask, col_mask, other=0):
  """Contiguous (rows, cols) tile of a 2-D ref at (row_start, col_start), masked to ``other``."""
  mask = row_mask[:, None] & col_mask[None, :]
  return plgpu.load(ref.at[pl.ds(row_start, rows), pl.ds(col_start, cols)], mask=mask, other=other)


def store_tile(ref, value, row_start, col_start, row_mask, col_mask) -> None:
  rows, cols = value.shape
  mask = row_mask[:, None] & col_mask[None, :]
  plgpu.store(ref.at[pl.ds(row_start, rows), pl.ds(col_start, cols)], value.astype(ref.dtype),
              mask=mask)


def load_vector(ref, start, size: int, mask, other=0):
  return plgpu.load(ref.at[pl.ds(start, size)], mask=mask, other=other)


def gather(ref, index, mask, other=0):
  """ref[index] for an integer index array, or a tuple of broadcastable ones for a 2-D ref (a
  pointer tensor in Triton); masked lanes read ``other`` and use index 0, so no lane ever
  addresses outside the ref."""
  if isinstance(index, tuple):
    index = tuple(jnp.broadcast_to(jnp.where(mask, i, 0), mask.shape) for i in index)
  else:
    index = jnp.where(mask, index, 0)
  return plgpu.load(ref.at[index], mask=mask, other=other)


def load_packed_codes(packed_ref, bits: int, code_index, other_index, mask, axis: int):
  """Codes of a tile from a ``quant.packing.pack_bits`` array (little-endian bit stream).

  packed_ref: 2-D uint8 ref packed along ``axis``; code ``i`` along that axis occupies bits
    ``[i * bits, (i + 1) * bits)`` of the byte stream (what pack_bits' group layout amounts to).
  code_index: (t,) int32 code positions along the packed axis (may repeat, e.g. ``k // d``).
  other_index: (u,) int32 positions along the other axis.
  mask: tile mask, shape (t, u) for axis=0 and (u, t) for axis=1.
  Returns int32 codes with the tile's shape; masked entries are 0.
  """
  n_bytes = packed_ref.shape[axis]
  bit_pos = code_index * bits
  first_byte = lax.shift_right_logical(bit_pos, np.int32(3))
  shift = lax.bitwise_and(bit_pos, np.int32(7))
  # Bytes a code can touch: one when bits divides 8 (codes never straddle), else enough to
  # cover ``shift + bits`` bits with shift <= 7.
  bytes_touched = 1 if 8 % bits == 0 else (7 + bits + 7) // 8
  if axis == 0:
    expand_code, expand_other = (lambda v: v[:, None]), (lambda v: v[None, :])
  else:
    expand_code, expand_other = (lambda v: v[None, :]), (lambda v: v[:, None])
  other_b = expand_other(other_index)
  word = None
  for t in range(bytes_touched):
    byte_index = first_byte + t
    byte_mask = mask & expand_code(byte_index < n_bytes)
    byte_b = expand_code(byte_index)
    index = (byte_b, other_b) if axis == 0 else (other_b, byte_b)
    byte = gather(packed_ref, index, byte_mask).astype(jnp.int32)
    byte = lax.shift_left(byte, np.int32(8 * t))
    word = byte if word is None else lax.bitwise_or(word, byte)
  codes = lax.shift_right_logical(word, expand_code(shift))
  return lax.bitwise_and(codes, np.int32((1 << bits) - 1))


def decode_e4m3_bits(bits_i32):
  """float8_e4m3fn bit patterns (int32 in [0, 255]) -> exact float32 values.

  E4M3FN (OCP FP8): sign bit 7, exponent bits 6..3 with bias 7, mantissa bits 2..0; exponent 0
  is subnormal (m * 2**-9); 0x7f / 0xff are NaN; no infinities.  Done with integer ops so that it
  lowers on every GPU generation (Triton's fp8 casts need sm_89+).
  """
  sign = lax.shift_right_logical(bits_i32, np.int32(7))
  exponent = lax.bitwise_and(lax.shift_right_logical(bits_i32, np.int32(3)), np.int32(15))
  mantissa = lax.bitwise_and(bits_i32, np.int32(7))
  # Normal: float32 exponent field = e - 7 + 127, mantissa's 3 bits at the top of 23.
  normal_bits = lax.bitwise_or(lax.shift_left(exponent + np.int32(120), np.int32(23)),
                               lax.shift_left(mantissa, np.int32(20)))
  normal = lax.bitcast_convert_type(normal_bits, jnp.float32)
  subnormal = mantissa.astype(jnp.float32) * np.float32(2.0 ** -9)
  magnitude = jnp.where(exponent == 0, subnormal, normal)
  value = jnp.where(sign == 1, -magnitude, magnitude)
  is_nan = lax.bitwise_and(bits_i32, np.int32(0x7F)) == 0x7F
  return jnp.where(is_nan, np.float32(np.nan), value)


# ----------------------------------------------------------------------------------------
# Host-side helpers.
# ----------------------------------------------------------------------------------------

MAX_INT_LUT_MULTIPLIER = 64


def int_lut_from_lut(lut) -> tuple[np.ndarray, int]:
  """(16,) float lut -> (int8 lut, multiplier) with int_lut == lut * multiplier exactly.

  The multiplier is the smallest power of two (<= 64) that makes every entry an integer in
  int8 range (E2M1: 2, E1M2 and E3M0-bias-3: 4, INT4: 1; see notes/interfaces.md).
  """
  lut = np.asarray(lut, np.float64)
  if lut.shape != (16,):
    raise ValueError(f"lut must have shape (16,), got {lut.shape}")
  multiplier = 1
  while multiplier <= MAX_INT_LUT_MULTIPLIER:
    scaled = lut * multiplier
    if np.all(scaled == np.round(scaled)) and np.all(np.abs(scaled) <= 127):
      return scaled.astype(np.int8), multiplier
    multiplier *= 2
  raise ValueError(f"lut {lut.tolist()} has no power-of-two integer multiple <= "
                   f"{MAX_INT_LUT_MULTIPLIER} within int8")


def tanh_approx(x):
  """float32 tanh by the GPU's tanh.approx.f32 (sm_75+, one MUFU op; max relative error about
  2^-11), for compiled Pallas-Triton kernels only: interpret mode cannot run inline PTX, so
  callers pass it only when not interpreting (fp4_mma's epilogue GELU)."""
  return plgpu.elementwise_inline_asm(
      "tanh.approx.f32 $0, $1;", args=[x], constraints="=f,f", pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)])[0]
