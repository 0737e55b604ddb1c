"""Triton kernels for DGP band selection: kernel -> launcher -> wrapper, top to bottom.

Implements every ``dgp::`` op of :mod:`dgp_kernels.ops.select` for CUDA tensors (and, under
``TRITON_INTERPRET=1``, for CPU tensors, which is how CI checks them without a GPU).
Semantics are the contract of docs/semantics.md, bit for bit:

* ``v = g`` or, with error feedback, ``v = g + e`` rounded once to the storage dtype exactly as
  torch does (float16/bfloat16 add in float32 and round to nearest even once);
* key ``bits(v) & ~sign`` (31 bits for float32, 15 for float16/bfloat16, 63 for float64)
  orders ``|v|``; ranks by key descending, ties by ascending flat index; the band is ranks
  ``[k_top, k_top + k_keep)``; output indices (int64) ascending, values unchanged;
* a NaN in ``v`` raises ``ValueError`` naming the tensor before anything is written.

Phases (each one launch for *all* layers, driven by a segment table of per-layer pointers
and a block table ``block -> (layer, start)``; no grid-wide synchronisation, so the
interpreter, which runs programs one after another, executes them as the GPU would; the
full table is in README.md):

1. Boundary ranges. Sampled path (large calls): ``_sample_kernel`` histograms the first
   11-bit key digit of a strided sample per layer (and that digit extended by
   ``FINE_BITS``), ``_range_kernel`` turns them into key ranges that hold rank ``k_top``
   (upper boundary) and ``k_top + k_keep - 1`` (lower) with high probability. Exact path (small calls, and the fallback): ``_hist_kernel``
   histograms every key, ``_locate_kernel`` finds the two buckets exactly.
2. ``_gather_kernel``: per block, the count of keys strictly between the two ranges (all
   kept) and the keys inside them appended to a per-layer candidate slot; on the sampled
   path also the NaN flags and per-block counts that ``_validate_kernel`` checks (layers
   whose sample missed are rerun on the exact path). One device->host sync reads the NaN flags
   (``ValueError`` before anything is written). ``_refine_kernel`` + ``_locate_kernel``
   then resolve the remaining digits on the candidates (on the data when the buckets are
   huge) until both boundary keys ``T_hi``, ``T_lo`` are exact, with each boundary's
   ordinal inside its tie group (by the tie rule, its position in index order).
3. ``_cand_count_kernel`` (or ``_count_kernel``): per block, keys strictly inside
   ``(T_lo, T_hi)`` and ties of each boundary, also summed per superblock of ``SUPER``
   blocks; ``_scan_kernel``: per-layer prefix sums over the superblocks (no per-element
   atomics); ``_write_kernel``: the block's first tie ordinals and output slot from its
   superblock's and the blocks before it in the superblock, then ordered compaction: kept =
   strictly inside, or tied at ``T_hi`` with ordinal ``>= skip_hi``, or tied at ``T_lo``
   with ordinal ``<= take_lo``; writes int64
   indices and values, the residual ``v`` with kept positions ``+0.0`` (error feedback),
   or the dense pruned tensor.
"""

from __future__ import annotations

import array
import functools
import inspect
import operator
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...ops import reference
from ...ops.checks import (
    band_counts,
    check_fractions,
    check_grad,
    check_grads,
    check_residual,
    check_residuals,
)

__all__ = [
    "select_triton",
    "select_ef_triton",
    "prune_triton",
    "prune_inplace_triton",
    "select_multi_triton",
    "select_ef_multi_triton",
    "band_multi_triton",
]

# Elements per program of the counting/compaction passes. 2048 lets one program hold a
# block in registers with 8 warps (8 elements per thread) and keeps the per-block tables
# small (25M elements -> 12k blocks). Not tuned on a GPU yet (1024 halves the registers of
# the gather and write passes on sm_90: 34 and 55 instead of 61 and 96).
BLOCK = 2048
# Histogram passes: each program loops over CHUNK elements TILE at a time and issues one
# atomic per non-empty bin at the end (2048 bins per 64K elements instead of one atomic per
# element), so the global atomics are ~1/32 of the traffic of a per-element scheme.
TILE = 2048
CHUNK = 32 * TILE
# Candidate refinement: fewer tiles per program, so that a few million candidates spread
# over enough programs to fill the GPU (64K per program left 96 programs for a 25M tensor).
CAND_CHUNK = 4 * TILE
# Candidate refinement copies the keys that match the prefix after two digits into a second
# slot at level 1 (a few percent of the candidates), so that the later levels (fp32: 2 of
# 5, fp64: 5 of 7) read only those instead of every candidate.
COMPACT_CANDIDATES = True
# The sampled path's ranges are key ranges, narrowed from the first digit to 2^-FINE_BITS
# of it by a second, finer histogram of the sample (one relaxed atomic per sampled entry):
# for float32 randn the candidates fall from ~14% to ~6% of the layer (a 600K-entry layer:
# 14.2% -> 5.8%; 1/64 instead of 1/8 of an octave per bucket); 0: whole first digits.
FINE_BITS = 3
# Blocks per superblock: the count passes add each block's counts into its superblock, the
# per-layer scan runs over superblocks (a 25M tensor: 191 instead of 12,208 blocks, in one
# program), and the write pass adds the counts of the at most SUPER - 1 blocks before it in
# its superblock (one packed sum of 21-bit fields: SUPER * BLOCK < 2^21).
SUPER = 64
# Copies of each layer's totals that the sampled gather adds its block counts into (block
# i into copy i % VALIDATE_LANES: fewer same-address atomics), summed by the validation.
VALIDATE_LANES = 8
# Superblocks per step of the per-layer scan (one program per layer).
SCAN_TILE = 1024
SCAN_WARPS = 8
# Superblocks per step of the same scan when it runs fused in the last program of a count
# pass (FUSE_TAILS): small, so that the tail does not raise the register count (and lower
# the occupancy) of the whole pass.
FUSED_SCAN_TILE = 512
# Programs per layer of the sampled path's sample histogram (one program per layer left
# the SMs idle for a single big tensor: 0.12 ms for a 25M tensor on an H200).
SAMPLE_SPLIT = 8
# Fused tails: each per-layer step (digit ranges, sample validation, each level's boundary
# location, the per-layer scan) runs in the last program of the launch before it instead of
# a launch of its own (a sampled call: 9 launches instead of 17). Off by default until it
# has been checked on a GPU (tests and benchmarks cover both settings).
FUSE_TAILS = os.environ.get("DGP_TRITON_FUSE", "0") == "1"
# Warps per program of the data passes (gather, count, write, histograms). Not tuned yet.
NUM_WARPS = 8
# Register caps (ptxas ``.maxnreg``) of the gather and write passes; 0: the compiler's
# choice. Both passes were issue-bound at low occupancy on an H200 (ncu: write 102
# registers, 24% occupancy; gather 77, 36%); the write pass now takes 96 on sm_90 (2
# programs of 8 warps per SM), 80 would allow 3. Swept by bench/gpu_profile.py; not
# measured yet.
GATHER_MAXNREG = 0
# The data passes index a layer in int32 (half the instructions of int64 indexing); block,
# tile and chunk ends must stay below 2^31 too.
MAX_LAYER = (1 << 31) - (1 << 16)
WRITE_MAXNREG = 0
# Persistent data passes (gather, write): PERSISTENT programs per SM (in the interpreter:
# programs) loop over the blocks, the full ones with PIPELINE_STAGES-deep software
# pipelining of their loads (cp.async into shared memory), so that the loads of the next
# blocks are in flight while a block's reductions and scans run; 0: one program per block.
# Off until measured on a GPU (bench/gpu_profile.py sweeps it).
PERSISTENT = 0
PIPELINE_STAGES = 3
FIRST_DIGIT_BITS = 11  # the first 11-bit digit covers the float exponent
# Candidate path while the boundary buckets hold at most max(CAND_MIN, n / CAND_FRACTION)
# entries in all: randn data puts ~3% and ~6% of n in the buckets of ranks 5% and 25%
# (an 11-bit digit of float32 is 1/8 of an octave). Beyond that (all zeros, all equal,
# few distinct values) the fallback refines over the data: one more read per digit but
# no buffer.
CAND_MIN = 1 << 16
CAND_FRACTION = 4
# Sampled path (from SAMPLED_MIN_TOTAL elements per call): the boundary digit ranges come
# from a strided sample of SAMPLE entries per layer (whole layers up to SAMPLE), widened by
# SAMPLE_SIGMAS binomial standard deviations + SAMPLE_SLACK ranks, so the histogram pass
# over the data is skipped: one full read fewer (fp32 with EF: ~23 instead of ~31 bytes per
# element). A miss (or a full candidate slot) is detected exactly and falls back to the
# exact path, so results never depend on the sample.
SAMPLED_MIN_TOTAL = 1 << 20
# Not float64: its first 11-bit digit is the bare exponent, a whole octave, so the ranges
# around ranks 5% and 25% of Gaussian-like data hold about half of the layer and the slot
# (n / CAND_FRACTION) overflows: every call would pay the sampled attempt for nothing.
SAMPLED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SAMPLE = 1 << 14
SAMPLE_SIGMAS = 5.0
SAMPLE_SLACK = 8

# dtype -> (KIND, key bits, digit widths after the first when refining candidates, when
# refining over the data): each set of widths sums to key bits - FIRST_DIGIT_BITS.
# tl.histogram costs about NBINS/32 x log2(NBINS) instructions per element on Triton 3.6
# (a warp-ballot lowering; measured on an H200: three 2048/1024-bin levels over the 3.7M
# candidates of a 25M tensor took 1.67 ms), so candidates are refined in 5-bit digits
# (32 bins: one bin per lane) at the price of more, cheap, levels. Over the data (the
# fallback for huge boundary buckets) every level is a full read, so digits stay wide.
_KINDS = {
    torch.float32: (0, 31, (5, 5, 5, 5), (10, 10)),
    torch.float64: (1, 63, (8, 8, 8, 8, 8, 8, 4), (11, 11, 11, 11, 8)),
    torch.float16: (2, 15, (4,), (4,)),
    torch.bfloat16: (3, 15, (4,), (4,)),
}
# Sampled path: the first candidate digit is histogrammed relative to the start of each
# boundary's digit range in REL_BINS bins when every range is that narrow (the usual case),
# else over all 2^11 first digits.
REL_BINS = 32
REL_FIRST_DIGIT = True  # False: always the 2^11-bin first-digit histogram (tests force it)
_TL_DTYPE = {
    torch.float32: tl.float32,
    torch.float64: tl.float64,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
}
# Key of +inf: a larger key is a NaN.
_INF_KEY = {
    torch.float32: 0x7F800000,
    torch.float64: 0x7FF0000000000000,
    torch.float16: 0x7C00,
    torch.bfloat16: 0x7F80,
}


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------
@triton.jit
def _bf16_to_f32(x):
    """Exact bfloat16 -> float32: the 16 bits become the high half of the float32."""
    return ((x.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _f32_to_bf16_rne(x):
    """float32 -> bfloat16 rounded to nearest even, in integers, as torch does it: a NaN
    becomes the quiet NaN 0x7FC0. (Adding the rounding bias to a NaN's bits can carry into
    the sign: the GPU's canonical NaN 0x7FFFFFFF would round to -0.0 and hide the NaN.)"""
    bits = x.to(tl.uint32, bitcast=True)
    r = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    r = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, r)
    return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _load_v(g_base, e_base, offs, m, KIND: tl.constexpr, HAS_E: tl.constexpr,
            MASKED: tl.constexpr):
    """``v = g`` or ``v = g + e`` rounded once to the storage dtype, as torch computes it.
    ``MASKED=False`` (a block entirely inside its layer): no mask, so that the loads can be
    vectorised (a mask computed from a layer size loaded at run time has unknown constancy
    and would force one 4-byte load per element)."""
    if MASKED:
        g = tl.load(g_base + offs, mask=m, other=0.0)
    else:
        g = tl.load(g_base + offs)
    if HAS_E:
        if MASKED:
            e = tl.load(e_base + offs, mask=m, other=0.0)
        else:
            e = tl.load(e_base + offs)
        if KIND == 2:  # float16: torch adds in float32 and rounds once (to nearest even)
            v = (g.to(tl.float32) + e.to(tl.float32)).to(tl.float16)
        elif KIND == 3:
            # bfloat16 <-> float32 by hand, in integers, identical on GPU and interpreter:
            # the interpreter's float32 -> bfloat16 cast truncates (measured: 501 of 1000
            # sums differed from torch) and its bfloat16 -> float32 cast garbles
            # subnormals (1941 of 2000); the GPU's casts are exact / round to nearest even.
            v = _f32_to_bf16_rne(_bf16_to_f32(g) + _bf16_to_f32(e))
        else:  # float32 / float64: one IEEE add
            v = g + e
    else:
        v = g
    return v


@triton.jit
def _base(ptrs, seg, DT: tl.constexpr, ALIGNED: tl.constexpr):
    """Data pointer of layer ``seg`` from a segment table; ``ALIGNED``: the launcher checked
    that every pointer of the call is 16-byte aligned, so tell the compiler (vector loads)."""
    p = tl.load(ptrs + seg).to(tl.pointer_type(DT))
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def _block_v(g_base, e_base, offs, m, full, KIND: tl.constexpr, HAS_E: tl.constexpr):
    """``_load_v`` of one block: unmasked (vectorisable) when the block is ``full``."""
    if full:
        v = _load_v(g_base, e_base, offs, m, KIND, HAS_E, False)
    else:
        v = _load_v(g_base, e_base, offs, m, KIND, HAS_E, True)
    return v


@triton.jit
def _block_offsets(blk_start, seg_n, pid, seg, BLOCK_: tl.constexpr):
    """``(offs, m, n, start)`` of block ``pid`` in int32 (layers hold < 2^31 elements):
    64-bit index arithmetic per element roughly doubled the instructions of the data
    passes, which are issue-bound, not bandwidth-bound, on an H200 (ncu)."""
    start = tl.multiple_of(tl.load(blk_start + pid).to(tl.int32), BLOCK_)
    n = tl.load(seg_n + seg).to(tl.int32)
    offs = start + tl.arange(0, BLOCK_)
    return offs, offs < n, n, start


@triton.jit
def _key_thresholds(t_hi, t_lo, seg, KEY32: tl.constexpr):
    """``T_hi``, ``T_lo`` in the key's integer type. For 31/15-bit keys: ``T_hi`` is a key
    or -1 (inactive layer); ``T_lo`` is a key or INT64_MAX (no lower tie group), which
    becomes 0x7FFFFFFF, above every non-NaN key (no NaN reaches the passes that use it)."""
    th = tl.load(t_hi + seg)
    tlo = tl.load(t_lo + seg)
    if KEY32:
        th = th.to(tl.int32)
        tlo = tl.minimum(tlo, 0x7FFFFFFF).to(tl.int32)
    return th, tlo


@triton.jit
def _rows(x, N: tl.constexpr, VEC: tl.constexpr):
    """The 1-D block ``x`` of ``N`` entries as a ``[N // VEC, VEC]`` matrix (row-major: no
    data moves). With ``VEC`` = the entries of one 16-byte vector load, a row is what one
    thread holds."""
    return tl.reshape(x, [N // VEC, VEC])


@triton.jit
def _excl_cumsum(x2):
    """Exclusive prefix sums of the row-major entries of the int32 matrix ``x2`` (a
    :func:`_rows` view): ``tl.cumsum(x, 0) - x`` of the 1-D block, as a matrix. The rows'
    sums, their exclusive scan, plus the scan inside each row: only one sum per row
    crosses threads. On the 1-D block, ``tl.cumsum`` took the one-entry-per-thread layout
    of the scatter store it fed and scanned every register across the block, and the store
    needed its key, mask and pointer moved through shared memory; stores of ``x2``-shaped
    operands keep the load's layout (sm_90, Triton 3.6, sampled float32 gather with EF, a
    full block: about 930 -> 660 SASS instructions with the constant mask of full blocks,
    and no shared-memory round trips)."""
    rs = tl.sum(x2, axis=1)
    return (tl.cumsum(rs, axis=0) - rs)[:, None] + (tl.cumsum(x2, axis=1) - x2)


@triton.jit
def _key(v, KIND: tl.constexpr):
    """Sign-cleared bit pattern of ``v``: orders ``|v|`` (int32, int64 for float64)."""
    if KIND == 0:
        k = v.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    elif KIND == 1:
        k = v.to(tl.int64, bitcast=True) & 0x7FFFFFFFFFFFFFFF
    else:
        k = v.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF
    return k


# tl.histogram takes a mask in recent Triton (3.6 and 3.9 do); older 3.x needs a workaround.
# entries of one 16-byte vector of the data per KIND (float32, float64, float16, bfloat16)
_VEC = tl.constexpr((4, 2, 8, 8))
_HIST_MASK = tl.constexpr("mask" in inspect.signature(tl.histogram).parameters)


@triton.jit
def _masked_histogram(d, m, NBINS: tl.constexpr, TILE_: tl.constexpr):
    """Histogram of ``d`` over the lanes where ``m``: ``tl.histogram``'s own mask, or (older
    Triton) masked lanes go to bin 0 and are taken back out, at the price of a block-wide
    count (a cross-warp reduction per tile)."""
    if _HIST_MASK:
        h = tl.histogram(d, NBINS, mask=m)
    else:
        h = tl.histogram(tl.where(m, d, 0), NBINS)
        n_off = TILE_ - tl.sum(m.to(tl.int32), axis=0)
        h = h - tl.where(tl.arange(0, NBINS) == 0, n_off, 0)
    return h


@triton.jit
def _last_program(tick, seg, target):
    """Fused tails (``FUSE``): True in the one program that finishes layer ``seg``'s share
    of a launch (``target`` = that share's program count - 1, plus the earlier launches'
    on a cumulative ticket), which then runs the per-layer step that used to be the next
    launch. The barrier orders this program's stores and atomics before its ticket; the
    ticket is an acq_rel atomic at GPU scope (release of this program's writes, acquire of
    the earlier programs'), and the last program reads their writes through L2 (``.cg``
    loads). No program waits for another, so the interpreter, which runs programs one
    after another, executes it as the GPU does. (The data atomics are all ``relaxed``: a
    default acq_rel atomic costs every thread a full GPU memory barrier; between launches
    the kernel boundary orders them, within a fused launch the barrier + ticket does, as
    in CUTLASS's ``__syncthreads(); thread 0: red.release.gpu`` arrival.)"""
    tl.debug_barrier()
    return tl.atomic_add(tick + seg, 1) == target


@triton.jit
def _hist_kernel(
    g_ptrs, e_ptrs, seg_n, chk_seg, chk_start, hist, nan_flag,
    tick, chk_nchk, prefix, rank0, rank, active, t_hi, t_lo, skip_hi, end_hi, take_lo, S,
    DT: tl.constexpr, KIND: tl.constexpr, HAS_E: tl.constexpr, ALIGNED: tl.constexpr,
    INF_KEY: tl.constexpr,
    SHIFT: tl.constexpr, NBINS: tl.constexpr, TILE_: tl.constexpr, CHUNK_: tl.constexpr,
    FUSE: tl.constexpr, WIDTH: tl.constexpr,
):
    """Phase 1: NaN flag and first-digit histogram of one chunk of one layer. ``FUSE``: the
    layer's last program then locates the boundary buckets (:func:`_locate_layer`, else
    ``_locate_kernel`` does; ``nan_flag`` holds the NaN flags, then the candidate counts)."""
    pid = tl.program_id(0)
    seg = tl.load(chk_seg + pid)
    start = tl.load(chk_start + pid)
    n = tl.load(seg_n + seg)
    g_base = _base(g_ptrs, seg, DT, ALIGNED)
    e_base = _base(e_ptrs, seg, DT, ALIGNED)
    end = tl.minimum(start + CHUNK_, n)
    h = tl.zeros([NBINS], dtype=tl.int32)
    nan = tl.zeros([TILE_], dtype=tl.int32)
    for off in range(start, end, TILE_):
        offs = off + tl.arange(0, TILE_)
        m = offs < end
        v = _load_v(g_base, e_base, offs, m, KIND, HAS_E, True)
        key = _key(v, KIND)
        # NaN <=> key above the key of inf (`v != v` misses bfloat16 NaN in the
        # interpreter, which holds bfloat16 as raw 16-bit integers).
        nan = nan | (m & (key > INF_KEY)).to(tl.int32)
        d = (key >> SHIFT).to(tl.int32)
        h += _masked_histogram(d, m, NBINS, TILE_)
    bins = tl.arange(0, NBINS)
    tl.atomic_add(hist + seg.to(tl.int64) * NBINS + bins, h, mask=h != 0, sem="relaxed")
    if tl.max(nan, axis=0) > 0:
        tl.atomic_max(nan_flag + seg, 1, sem="relaxed")
    if FUSE:
        if _last_program(tick, seg, tl.load(chk_nchk + seg) - 1):
            _locate_layer(seg, hist, prefix, rank0, rank, active, nan_flag, t_hi, t_lo,
                          skip_hi, end_hi, take_lo, S, NBINS, WIDTH, True, False, False, False)


@triton.jit
def _gather_kernel(
    g_ptrs, e_ptrs, seg_n, blk_seg, blk_start, range_a, range_b, cnt, blk_cstart, blk_ccount,
    cand_off, cand_cap, cand_fill, cand_key, totals, flags, S,
    tick, seg_first, seg_nblk, rank, active, tail_n,
    num_blocks, full_ids, n_full, part_ids, n_part,
    DT: tl.constexpr, KIND: tl.constexpr, HAS_E: tl.constexpr, ALIGNED: tl.constexpr,
    SAMPLED: tl.constexpr,
    INF_KEY: tl.constexpr, SHIFT: tl.constexpr, BLOCK_: tl.constexpr,
    FUSE: tl.constexpr, LANES: tl.constexpr, WIDE_MISSES: tl.constexpr,
    PERSIST: tl.constexpr, STAGES: tl.constexpr,
):
    """Phase 2: per block, count the keys whose first digit lies strictly between the lower
    and the upper boundary's digit range (all kept) into ``cnt[0]``, and append the keys
    *in* a range to the layer's candidate slot. One atomic per block reserves a contiguous
    range, recorded in ``blk_cstart``/``blk_ccount`` so that the block's candidates can be
    counted again without atomics once the thresholds are exact.

    Rows ``2*seg`` / ``2*seg+1`` of ``range_a..range_b`` are the digit ranges of the upper /
    lower boundary: single buckets after the exact first-digit histogram, or, ``SAMPLED``,
    ranges estimated from a sample. Then this is the first full read, so it also flags NaN
    and adds its counts (above the upper range, in it, in the lower range only, strictly
    between) into the layer's ``totals`` (``LANES`` copies, by block, against contention:
    two relaxed int64 atomics of two 32-bit fields each) that ``_validate_kernel`` checks
    against the ranks; candidates beyond a slot's capacity are dropped (the call
    then falls back). ``FUSE`` (sampled): the block that completes a layer then runs
    :func:`_validate_layer` (else ``_validate_kernel`` does).

    The blocks come as two lists from the plan: the full ones (``full_ids``:
    unmasked, vectorised, no per-entry bound) and the partial ones (``part_ids``: masked).
    One program per block, or, ``PERSIST``, a grid of a few programs per SM that loop over
    the full blocks with ``STAGES``-deep software pipelining of the loads (cp.async on
    sm_80+), then over the partial ones."""
    a = (g_ptrs, e_ptrs, seg_n, blk_seg, blk_start, range_a, range_b, cnt, blk_cstart,
         blk_ccount, cand_off, cand_cap, cand_fill, cand_key, totals, flags, S, tick,
         seg_first, seg_nblk, rank, active, tail_n, num_blocks)
    if PERSIST:
        pid, nprog = tl.program_id(0), tl.num_programs(0)
        for t in tl.range(pid, n_full, nprog, num_stages=STAGES):
            _gather_block(tl.load(full_ids + t), 1, a, DT, KIND, HAS_E, ALIGNED, SAMPLED,
                          INF_KEY, SHIFT, BLOCK_, FUSE, LANES, WIDE_MISSES)
        for t in range(pid, n_part, nprog):
            _gather_block(tl.load(part_ids + t), 2, a, DT, KIND, HAS_E, ALIGNED, SAMPLED,
                          INF_KEY, SHIFT, BLOCK_, FUSE, LANES, WIDE_MISSES)
    else:  # one program per block: the full blocks, then the partial ones
        pid = tl.program_id(0)
        if pid < n_full:
            _gather_block(tl.load(full_ids + pid), 1, a, DT, KIND, HAS_E, ALIGNED, SAMPLED,
                          INF_KEY, SHIFT, BLOCK_, FUSE, LANES, WIDE_MISSES)
        else:
            _gather_block(tl.load(part_ids + (pid - n_full)), 2, a, DT, KIND, HAS_E, ALIGNED,
                          SAMPLED, INF_KEY, SHIFT, BLOCK_, FUSE, LANES, WIDE_MISSES)


@triton.jit
def _gather_block(
    pid, FULL: tl.constexpr, a,
    DT: tl.constexpr, KIND: tl.constexpr, HAS_E: tl.constexpr, ALIGNED: tl.constexpr,
    SAMPLED: tl.constexpr,
    INF_KEY: tl.constexpr, SHIFT: tl.constexpr, BLOCK_: tl.constexpr,
    FUSE: tl.constexpr, LANES: tl.constexpr, WIDE_MISSES: tl.constexpr,
):
    """Block ``pid`` of :func:`_gather_kernel`. ``FULL``: 1 the block lies inside its layer
    (unmasked, vectorised loads, and no per-entry bound: the mask is a constant that the
    compiler folds away), 2 it may not (masked). ``a``: the kernel's runtime arguments."""
    (g_ptrs, e_ptrs, seg_n, blk_seg, blk_start, range_a, range_b, cnt, blk_cstart, blk_ccount,
     cand_off, cand_cap, cand_fill, cand_key, totals, flags, S, tick, seg_first, seg_nblk,
     rank, active, tail_n, num_blocks) = a
    seg = tl.load(blk_seg + pid)
    offs, m, n, start = _block_offsets(blk_start, seg_n, pid, seg, BLOCK_)
    if FULL == 1:
        m = tl.full([BLOCK_], 1, tl.int1)
    g_base = _base(g_ptrs, seg, DT, ALIGNED)
    e_base = _base(e_ptrs, seg, DT, ALIGNED)
    v = _load_v(g_base, e_base, offs, m, KIND, HAS_E, FULL == 2)
    key = _key(v, KIND)
    if SAMPLED:  # key ranges from the sample (32-bit keys: int32 compares)
        dig = key
    else:  # single first-digit buckets: 11-bit digits, int32 compares
        dig = (key >> SHIFT).to(tl.int32)
    ha = tl.load(range_a + 2 * seg)  # -1 for an empty band: matches nothing
    hb = tl.load(range_b + 2 * seg)
    la = tl.load(range_a + 2 * seg + 1)
    lb = tl.load(range_b + 2 * seg + 1)
    if not (SAMPLED and KIND == 1):  # (float64 key ranges stay int64)
        ha, hb, la, lb = ha.to(tl.int32), hb.to(tl.int32), la.to(tl.int32), lb.to(tl.int32)
    in_h = m & (dig >= ha) & (dig <= hb)
    in_l = m & (dig >= la) & (dig <= lb) & (~in_h)
    strict = m & (dig > lb) & (dig < ha)
    # Per-block counts in 12-bit fields of int32 sums (BLOCK_ <= 2048): two reductions.
    c = (in_h | in_l).to(tl.int32)
    pa = tl.sum(strict.to(tl.int32) | (in_h.to(tl.int32) << 12), axis=0)
    n_in_h = pa >> 12
    tl.store(cnt + pid, pa & 0xFFF)
    if SAMPLED:
        pb = tl.sum(in_l.to(tl.int32) | ((m & (dig > hb)).to(tl.int32) << 12), axis=0)
        n_in_l = pb & 0xFFF
    else:
        n_in_l = tl.sum(in_l.to(tl.int32), axis=0)
    nc = n_in_h + n_in_l
    tl.store(blk_ccount + pid, nc)
    if SAMPLED:
        # a NaN in the block (a count, not a max: an int64 max reduction missed the NaN of
        # float64 blocks on an H200 with Triton 3.6, where this count form passed)
        if tl.sum((m & (key > INF_KEY)).to(tl.int32), axis=0) > 0:
            tl.atomic_max(flags + seg, 1, sem="relaxed")
            tl.atomic_max(flags + 3 * S, 1, sem="relaxed")  # the call holds a NaN: no writes
        # into one of the layer's LANES copies of the totals (fields < 2^31: no carry)
        lane = totals + 2 * (seg * LANES + pid % LANES)
        tl.atomic_add(lane, (pb >> 12).to(tl.int64) | (n_in_h.to(tl.int64) << 32),
                      sem="relaxed")
        tl.atomic_add(lane + 1, n_in_l.to(tl.int64) | ((pa & 0xFFF).to(tl.int64) << 32),
                      sem="relaxed")
    if nc > 0:
        rel = tl.atomic_add(cand_fill + seg, nc, sem="relaxed")
        base = tl.load(cand_off + seg) + rel
        tl.store(blk_cstart + pid, base)
        c2 = _rows(c, BLOCK_, _VEC[KIND])
        cs = _excl_cumsum(c2)  # int32 position in the block's reservation
        room = tl.maximum(tl.minimum(tl.load(cand_cap + seg) - rel, BLOCK_), 0).to(tl.int32)
        tl.store((cand_key + base) + cs, _rows(key, BLOCK_, _VEC[KIND]),
                 mask=(c2 != 0) & (cs < room))
    if FUSE and SAMPLED:
        if _last_program(tick, seg, tl.load(seg_nblk + seg) - 1):
            _validate_layer(seg, totals, range_a, rank, active, cand_cap, cand_fill, flags, S,
                            seg_n, tail_n, LANES, WIDE_MISSES)


@triton.jit
def _sample_kernel(
    g_ptrs, e_ptrs, seg_n, hist, tick, rank0, rank, active, range_a, range_b, rstart, wide,
    DT: tl.constexpr, KIND: tl.constexpr, HAS_E: tl.constexpr, ALIGNED: tl.constexpr,
    SHIFT: tl.constexpr,
    NBINS: tl.constexpr, SAMPLE_: tl.constexpr, SPLIT: tl.constexpr, TILE_: tl.constexpr,
    FUSE: tl.constexpr, SIGMAS: tl.constexpr, SLACK: tl.constexpr, REL: tl.constexpr,
    FINE: tl.constexpr,
):
    """Sampled path, phase 1: first-digit histogram of ``min(n, SAMPLE_)`` entries of one
    layer at a fixed stride (all of it when ``n <= SAMPLE_``, so small layers are exact).
    Program ``(seg, p)`` takes the ``p``-th of ``SPLIT`` parts of the sample and adds its
    histogram into the zeroed ``hist`` row (one atomic per non-empty bin), and, ``FINE``,
    the histogram of the first digit extended by ``FINE`` more bits into the layer's row of
    ``NBINS << FINE`` bins after all S coarse rows (one relaxed atomic per sampled entry:
    the bins are many and the sample small). ``FUSE``: the layer's last program then runs
    :func:`_range_layer` (else ``_range_kernel`` does)."""
    seg = tl.program_id(0)
    part = tl.program_id(1)
    n = tl.load(seg_n + seg)
    g_base = _base(g_ptrs, seg, DT, ALIGNED)
    e_base = _base(e_ptrs, seg, DT, ALIGNED)
    s = tl.minimum(n, SAMPLE_)
    stride = n // tl.maximum(s, 1)
    per = (s + SPLIT - 1) // SPLIT
    lo = part * per
    hi = tl.minimum(lo + per, s)
    h = tl.zeros([NBINS], dtype=tl.int32)
    for off in range(lo, hi, TILE_):
        i = off + tl.arange(0, TILE_)
        m = i < hi
        key = _key(_load_v(g_base, e_base, i * stride, m, KIND, HAS_E, True), KIND)
        h += _masked_histogram((key >> SHIFT).to(tl.int32), m, NBINS, TILE_)
        if FINE > 0:
            frow = hist + tl.num_programs(0) * NBINS + seg.to(tl.int64) * (NBINS << FINE)
            tl.atomic_add(frow + (key >> (SHIFT - FINE)).to(tl.int32), 1, mask=m, sem="relaxed")
    bins = tl.arange(0, NBINS)
    tl.atomic_add(hist + seg.to(tl.int64) * NBINS + bins, h, mask=h != 0, sem="relaxed")
    if FUSE:
        if _last_program(tick, seg, SPLIT - 1):
            _range_layer(seg, hist, seg_n, rank0, rank, active, range_a, range_b, rstart, wide,
                         NBINS, SAMPLE_, SIGMAS, SLACK, REL, FINE, SHIFT)


@triton.jit
def _sample_range(row, frow, rho, d, s, exact, NBINS: tl.constexpr, FINE: tl.constexpr,
                  SHIFT: tl.constexpr):
    """Keys ``[ka, kb]`` spanning sample ranks ``rho - d .. rho + d (+1)``, and the first
    digits ``a``, ``b`` of those ends: the first digit holding each end's rank, narrowed
    (``FINE``) to the ``2^FINE``-th of that digit holding it (``frow``: the layer's row of
    first digits extended by ``FINE`` bits). A side that hits the end of the sample runs to
    the end of the key range (the layer's extreme values need not be in the sample)."""
    top = rho - d
    bottom = rho + d + (1 - exact.to(tl.int64))
    b, r_b, _s0 = _locate_row(row, tl.maximum(top, 0), NBINS, NBINS)
    a, r_a, _s1 = _locate_row(row, tl.minimum(bottom, s - 1), NBINS, NBINS)
    b64 = b.to(tl.int64)  # keys in int64 (float64's 63-bit keys)
    a64 = a.to(tl.int64)
    if FINE > 0:  # the sub-bucket of each end's digit that holds its rank
        fb, _r2, _s2 = _locate_row(frow + (b64 << FINE), r_b, 1 << FINE, 1 << FINE)
        fa, _r3, _s3 = _locate_row(frow + (a64 << FINE), r_a, 1 << FINE, 1 << FINE)
        kb = ((((b64 << FINE) | fb) + 1) << (SHIFT - FINE)) - 1
        ka = ((a64 << FINE) | fa) << (SHIFT - FINE)
    else:
        kb = ((b64 + 1) << SHIFT) - 1
        ka = a64 << SHIFT
    run_top = (top <= 0) & (~exact)
    run_bottom = (bottom >= s - 1) & (~exact)
    b = tl.where(run_top, NBINS - 1, b)
    kb = tl.where(run_top, kb * 0 + ((NBINS << SHIFT) - 1), kb)  # every key up to NaN's
    a = tl.where(run_bottom, 0, a)
    ka = tl.where(run_bottom, 0, ka)
    return a, b, ka, kb


@triton.jit
def _range_layer(
    seg, hist, seg_n, rank0, rank, active, range_a, range_b, rstart, wide,
    NBINS: tl.constexpr, SAMPLE_: tl.constexpr, SIGMAS: tl.constexpr, SLACK: tl.constexpr,
    REL: tl.constexpr, FINE: tl.constexpr, SHIFT: tl.constexpr,
):
    """Sampled path: key ranges ``[range_a, range_b]`` that hold each boundary's rank of
    layer ``seg`` with high probability (see :func:`_sample_range`), and the first digit of
    each range's start (``rstart``). In sample space a boundary sits at rank
    ``rho = R * s / n`` give or take a binomial ``sqrt(s p (1 - p))``; the range spans the
    keys at ranks ``rho -/+ (SIGMAS * that + SLACK)`` (exactly ``rho`` when the whole layer
    was sampled). Ranges that share a first digit merge (so that no later digit level ever
    sees keys of both in one bucket). ``wide[seg]`` = 1 when a range of an active layer
    spans more than ``REL`` first digits. Copies the layer's two ranks from the plan's
    ``rank0`` into the call's ``rank``."""
    frow = hist + tl.num_programs(0) * NBINS + seg.to(tl.int64) * (NBINS << FINE)
    n = tl.load(seg_n + seg)
    act = tl.load(active + seg) != 0
    s = tl.minimum(n, SAMPLE_)
    row = hist + seg.to(tl.int64) * NBINS
    exact = s == n
    sf = tl.maximum(s, 1).to(tl.float32)
    rr_hi = tl.load(rank0 + 2 * seg)
    rho = (rr_hi * s) // tl.maximum(n, 1)
    p = rho.to(tl.float32) / sf
    d = tl.where(exact, 0, (SIGMAS * tl.sqrt(sf * p * (1.0 - p)) + SLACK).to(tl.int64))
    a_hi, b_hi, ka_hi, kb_hi = _sample_range(row, frow, rho, d, s, exact, NBINS, FINE, SHIFT)
    rr_lo = tl.load(rank0 + 2 * seg + 1)
    rho = (rr_lo * s) // tl.maximum(n, 1)
    p = rho.to(tl.float32) / sf
    d = tl.where(exact, 0, (SIGMAS * tl.sqrt(sf * p * (1.0 - p)) + SLACK).to(tl.int64))
    a_lo, b_lo, ka_lo, kb_lo = _sample_range(row, frow, rho, d, s, exact, NBINS, FINE, SHIFT)
    merge = b_lo >= a_hi
    a_hi = tl.where(merge, a_lo, a_hi)
    b_lo = tl.where(merge, b_hi, b_lo)
    ka_hi = tl.where(merge, ka_lo, ka_hi)
    kb_lo = tl.where(merge, kb_hi, kb_lo)
    tl.store(range_a + 2 * seg, tl.where(act, ka_hi, -1).to(tl.int64))
    tl.store(range_b + 2 * seg, tl.where(act, kb_hi, -1).to(tl.int64))
    tl.store(range_a + 2 * seg + 1, tl.where(act, ka_lo, -1).to(tl.int64))
    tl.store(range_b + 2 * seg + 1, tl.where(act, kb_lo, -1).to(tl.int64))
    tl.store(rstart + 2 * seg, tl.where(act, a_hi, -1).to(tl.int64))
    tl.store(rstart + 2 * seg + 1, tl.where(act, a_lo, -1).to(tl.int64))
    too_wide = (b_hi - a_hi >= REL) | (b_lo - a_lo >= REL)
    tl.store(wide + seg, (act & too_wide).to(tl.int64))
    tl.store(rank + 2 * seg, rr_hi)
    tl.store(rank + 2 * seg + 1, rr_lo)


@triton.jit
def _range_kernel(
    hist, seg_n, rank0, rank, active, range_a, range_b, rstart, wide,
    NBINS: tl.constexpr, SAMPLE_: tl.constexpr, SIGMAS: tl.constexpr, SLACK: tl.constexpr,
    REL: tl.constexpr, FINE: tl.constexpr, SHIFT: tl.constexpr,
):
    """Sampled path: :func:`_range_layer` of every layer, one program each."""
    _range_layer(tl.program_id(0), hist, seg_n, rank0, rank, active, range_a, range_b, rstart,
                 wide, NBINS, SAMPLE_, SIGMAS, SLACK, REL, FINE, SHIFT)


@triton.jit
def _validate_layer(
    seg, totals, range_a, rank, active, cand_cap, cand_fill, flags, S, seg_n, tail_n,
    LANES: tl.constexpr, WIDE_MISSES: tl.constexpr,
):
    """Sampled path: is each boundary's rank of layer ``seg`` inside its range (else the
    sample missed)? Sums the layer's ``LANES`` copies of the gather's totals, writes
    ``flags[S + seg] = 1`` on a miss or a candidate-slot overflow (or, ``WIDE_MISSES``, a
    range too wide for the relative first digit: ``flags[2 * S + seg]``), and turns the
    ranks into ranks inside the ranges (rank minus the keys above the range). A missed
    layer gets no candidates (``cand_fill`` 0) and size 0 for the tail (``tail_n``), which
    then neither reads nor writes it. Reads the gather's atomics through L2 (``.cg``)."""
    act = tl.load(active + seg) != 0
    j = tl.arange(0, LANES)
    row = totals + 2 * (seg * LANES + j)
    t0 = tl.sum(tl.load(row, cache_modifier=".cg"), axis=0)
    t1 = tl.sum(tl.load(row + 1, cache_modifier=".cg"), axis=0)
    above, n_h = t0 & 0xFFFFFFFF, t0 >> 32
    n_l, n_b = t1 & 0xFFFFFFFF, t1 >> 32
    r_hi = tl.load(rank + 2 * seg)
    r_lo = tl.load(rank + 2 * seg + 1)
    merged = tl.load(range_a + 2 * seg) == tl.load(range_a + 2 * seg + 1)
    ok_hi = (r_hi >= above) & (r_hi < above + n_h)
    base_lo = tl.where(merged, above, above + n_h + n_b)
    ok_lo = (r_lo >= base_lo) & (r_lo < base_lo + tl.where(merged, n_h, n_l))
    fill = tl.load(cand_fill + seg, cache_modifier=".cg")
    fits = fill <= tl.load(cand_cap + seg)
    bad = act & ~(ok_hi & ok_lo & fits)
    if WIDE_MISSES:
        bad = bad | (act & (tl.load(flags + 2 * S + seg) != 0))
    tl.store(flags + S + seg, bad.to(tl.int64))
    tl.store(cand_fill + seg, tl.where(bad, 0, fill))
    tl.store(tail_n + seg, tl.where(bad, 0, tl.load(seg_n + seg)))
    tl.store(rank + 2 * seg, r_hi - above)
    tl.store(rank + 2 * seg + 1, r_lo - base_lo)


@triton.jit
def _validate_kernel(
    totals, range_a, rank, active, cand_cap, cand_fill, flags, S, seg_n, tail_n,
    LANES: tl.constexpr, WIDE_MISSES: tl.constexpr,
):
    """Sampled path: :func:`_validate_layer` of every layer, one program each."""
    _validate_layer(tl.program_id(0), totals, range_a, rank, active, cand_cap, cand_fill,
                    flags, S, seg_n, tail_n, LANES, WIDE_MISSES)


@triton.jit
def _cand_count_kernel(
    seg_n, blk_seg, blk_cstart, blk_ccount, cand_key, t_hi, t_lo, cnt, num_blocks,
    tick, seg_first, seg_nblk, seg_sbf, seg_nsb, sb_cnt, n_sb, offsets, skip_hi, end_hi,
    take_lo, sb_ord_hi, sb_ord_lo, sb_out,
    BLOCK_: tl.constexpr, KEY32: tl.constexpr, FUSE: tl.constexpr, SCAN: tl.constexpr,
    SUPER: tl.constexpr,
):
    """Phase 3a (candidate path): add each block's candidates strictly inside
    (T_lo, T_hi) to ``cnt[0]`` and count its ties of T_hi and T_lo (``cnt[1]``, ``cnt[2]``);
    see :func:`_finish_count`."""
    pid = tl.program_id(0)
    seg = tl.load(blk_seg + pid)
    # a layer the tail skips (size 0) has no candidates to count (its slot may overflow)
    nc = tl.where(tl.load(seg_n + seg) > 0, tl.load(blk_ccount + pid), 0)
    start = tl.load(blk_cstart + pid, mask=nc > 0, other=0)
    offs = tl.arange(0, BLOCK_)
    m = offs < nc
    key = tl.load(cand_key + start + offs, mask=m, other=0)
    th, tlo = _key_thresholds(t_hi, t_lo, seg, KEY32)
    pa = tl.sum((m & (key > tlo) & (key < th)).to(tl.int32) | ((m & (key == th)).to(tl.int32) << 16),
                axis=0)  # 16-bit fields (BLOCK_ <= 2048)
    _finish_count(pid, seg, tl.load(cnt + pid) + (pa & 0xFFFF), pa >> 16,
                  tl.sum((m & (key == tlo)).to(tl.int32), axis=0), cnt, num_blocks, tick,
                  seg_first, seg_nblk, seg_sbf, seg_nsb, sb_cnt, n_sb, offsets, skip_hi, end_hi,
                  take_lo, sb_ord_hi, sb_ord_lo, sb_out, FUSE, SCAN, SUPER)


@triton.jit
def _finish_count(
    pid, seg, c0, ch, cl, cnt, num_blocks,
    tick, seg_first, seg_nblk, seg_sbf, seg_nsb, sb_cnt, n_sb, offsets, skip_hi, end_hi,
    take_lo, sb_ord_hi, sb_ord_lo, sb_out,
    FUSE: tl.constexpr, SCAN: tl.constexpr, SUPER: tl.constexpr,
):
    """Store block ``pid``'s counts (strictly inside, ties of T_hi, ties of T_lo) and add
    them to its superblock (``SUPER`` consecutive blocks of the layer; one relaxed int64
    atomic, three 21-bit fields). ``FUSE``: the layer's last program then scans the layer's
    superblocks (:func:`_scan_layer`, else ``_scan_kernel`` does)."""
    tl.store(cnt + pid, c0)
    tl.store(cnt + num_blocks + pid, ch)
    tl.store(cnt + 2 * num_blocks + pid, cl)
    b0 = tl.load(seg_first + seg)
    sb = tl.load(seg_sbf + seg) + (pid - b0) // SUPER
    tl.atomic_add(sb_cnt + sb, c0.to(tl.int64) | (ch.to(tl.int64) << 21) | (cl.to(tl.int64) << 42),
                  sem="relaxed")
    if FUSE:
        if _last_program(tick, seg, tl.load(seg_nblk + seg) - 1):
            _scan_layer(seg, sb_cnt, seg_sbf, seg_nsb, offsets, skip_hi, end_hi, take_lo,
                        sb_ord_hi, sb_ord_lo, sb_out, SCAN)


@triton.jit
def _refine_kernel(
    g_ptrs, e_ptrs, seg_n, chk_seg, chk_start, cand_off, cand_key, prefix_a, prefix_b, hist,
    tick, chk_nchk, level, prefix, rank, active, flags, t_hi, t_lo, skip_hi, end_hi, take_lo, S,
    cand2, fill2,
    DT: tl.constexpr, KIND: tl.constexpr, HAS_E: tl.constexpr, ALIGNED: tl.constexpr,
    FROM_CAND: tl.constexpr,
    REL: tl.constexpr, PSHIFT: tl.constexpr, DSHIFT: tl.constexpr, DMASK: tl.constexpr,
    NBINS: tl.constexpr, TILE_: tl.constexpr, CHUNK_: tl.constexpr,
    FUSE: tl.constexpr, WIDTH: tl.constexpr, APPEND: tl.constexpr, FINAL: tl.constexpr,
    COMPACT: tl.constexpr, KEYRANGE: tl.constexpr,
):
    """Phase 2: histogram of the next digit of the keys whose higher bits lie in
    ``[prefix_a, prefix_b]`` of the upper (row ``2*seg``) or lower (row ``2*seg+1``)
    boundary of their layer (one value, the prefix found so far, except for the first
    level of the sampled path, which starts from digit ranges). Keys come from the layer's
    candidate slot (``FROM_CAND``; ``seg_n`` then holds slot fill counts) or are recomputed
    from the data (the fallback for huge boundary buckets). ``KEYRANGE`` (the sampled
    path's first level): ``[prefix_a, prefix_b]`` are key ranges, not digit prefixes.
    ``REL``: the digit is the first digit minus that of the row's range start (``NBINS``
    covers every range).
    ``FUSE``: the layer's last program then locates the level's boundary digits
    (:func:`_locate_layer` with ``WIDTH``, ``APPEND``, ``REL``, ``FINAL``; else
    ``_locate_kernel`` does); the ticket counts every level's programs (``level`` levels
    of ``chk_nchk[seg]`` programs came before). ``COMPACT`` (candidates): also copy the
    keys that match a prefix into the same slot of ``cand2`` (``fill2`` counts them: one
    relaxed atomic per tile), so that the later levels read those few instead of every
    candidate."""
    pid = tl.program_id(0)
    seg = tl.load(chk_seg + pid)
    start = tl.load(chk_start + pid)
    n = tl.load(seg_n + seg)
    g_base = _base(g_ptrs, seg, DT, ALIGNED)
    e_base = _base(e_ptrs, seg, DT, ALIGNED)
    c_base = tl.load(cand_off + seg)
    a_hi = tl.load(prefix_a + 2 * seg)
    b_hi = tl.load(prefix_b + 2 * seg)
    a_lo = tl.load(prefix_a + 2 * seg + 1)
    b_lo = tl.load(prefix_b + 2 * seg + 1)
    end = tl.minimum(start + CHUNK_, n)
    h_hi = tl.zeros([NBINS], dtype=tl.int32)
    h_lo = tl.zeros([NBINS], dtype=tl.int32)
    for off in range(start, end, TILE_):
        offs = off + tl.arange(0, TILE_)
        m = offs < end
        if FROM_CAND:
            key = tl.load(cand_key + c_base + offs, mask=m, other=0)
        else:
            key = _key(_load_v(g_base, e_base, offs, m, KIND, HAS_E, True), KIND)
        top = key >> PSHIFT
        if REL:
            d_hi = (top - (a_hi >> PSHIFT)).to(tl.int32)
            d_lo = (top - (a_lo >> PSHIFT)).to(tl.int32)
        else:
            d_hi = ((key >> DSHIFT) & DMASK).to(tl.int32)
            d_lo = d_hi
        if KEYRANGE:
            m_hi = m & (key >= a_hi) & (key <= b_hi)
            m_lo = m & (key >= a_lo) & (key <= b_lo)
        else:
            m_hi = m & (top >= a_hi) & (top <= b_hi)
            m_lo = m & (top >= a_lo) & (top <= b_lo)
        if REL:  # (in range by construction: a range spanning more bins marks the layer
            # missed and empties its slot; the GPU's histogram would wrap an out-of-range
            # digit into a bin where the interpreter drops it, so make them agree anyway)
            m_hi = m_hi & (d_hi >= 0) & (d_hi < NBINS)
            m_lo = m_lo & (d_lo >= 0) & (d_lo < NBINS)
        h_hi += _masked_histogram(d_hi, m_hi, NBINS, TILE_)
        h_lo += _masked_histogram(d_lo, m_lo, NBINS, TILE_)
        if COMPACT:
            k = (m_hi | m_lo).to(tl.int32)
            nk = tl.sum(k, axis=0)
            if nk > 0:
                at = tl.atomic_add(fill2 + seg, nk, sem="relaxed")
                # (a plain cumsum: the candidate keys' loads are not vectorised, so the
                # matrix view would move them through shared memory: 64 -> 128 registers)
                tl.store(cand2 + c_base + at + (tl.cumsum(k, axis=0) - k), key, mask=k != 0)
    bins = tl.arange(0, NBINS)
    row = seg.to(tl.int64) * 2
    tl.atomic_add(hist + row * NBINS + bins, h_hi, mask=h_hi != 0, sem="relaxed")
    tl.atomic_add(hist + (row + 1) * NBINS + bins, h_lo, mask=h_lo != 0, sem="relaxed")
    if FUSE:
        if _last_program(tick, seg, (level + 1) * tl.load(chk_nchk + seg) - 1):
            _locate_layer(seg, hist, prefix, rank, rank, active, flags, t_hi, t_lo, skip_hi,
                          end_hi, take_lo, S, NBINS, WIDTH, False, APPEND, REL, FINAL)


@triton.jit
def _count_kernel(
    g_ptrs, e_ptrs, seg_n, blk_seg, blk_start, t_hi, t_lo, counts, num_blocks,
    tick, seg_first, seg_nblk, seg_sbf, seg_nsb, sb_cnt, n_sb, offsets, skip_hi, end_hi,
    take_lo, sb_ord_hi, sb_ord_lo, sb_out,
    DT: tl.constexpr, KIND: tl.constexpr, HAS_E: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK_: tl.constexpr, FUSE: tl.constexpr, SCAN: tl.constexpr, SUPER: tl.constexpr,
):
    """Phase 3a: per block, #keys strictly inside (T_lo, T_hi), #keys == T_hi, #keys == T_lo;
    see :func:`_finish_count`."""
    pid = tl.program_id(0)
    seg = tl.load(blk_seg + pid)
    offs, m, n, start = _block_offsets(blk_start, seg_n, pid, seg, BLOCK_)
    g_base = _base(g_ptrs, seg, DT, ALIGNED)
    e_base = _base(e_ptrs, seg, DT, ALIGNED)
    key = _key(_block_v(g_base, e_base, offs, m, start <= n - BLOCK_, KIND, HAS_E), KIND)
    th, tlo = _key_thresholds(t_hi, t_lo, seg, KIND != 1)
    pa = tl.sum((m & (key > tlo) & (key < th)).to(tl.int32) | ((m & (key == th)).to(tl.int32) << 16),
                axis=0)  # 16-bit fields (BLOCK_ <= 2048)
    _finish_count(pid, seg, pa & 0xFFFF, pa >> 16,
                  tl.sum((m & (key == tlo)).to(tl.int32), axis=0), counts, num_blocks, tick,
                  seg_first, seg_nblk, seg_sbf, seg_nsb, sb_cnt, n_sb, offsets, skip_hi, end_hi,
                  take_lo, sb_ord_hi, sb_ord_lo, sb_out, FUSE, SCAN, SUPER)


@triton.jit
def _locate_row(hrow, r, NBINS: tl.constexpr, NB: tl.constexpr):
    """Digit whose bucket holds rank ``r`` counting from the largest digit down, ``r``
    minus the entries of larger digits, and the bucket's size (``NB`` used bins)."""
    j = tl.arange(0, NBINS)
    # largest first; through L2 (``.cg``): other programs' atomics wrote the row
    h = tl.load(hrow + (NB - 1 - j), mask=j < NB, other=0, cache_modifier=".cg").to(tl.int64)
    cum = tl.cumsum(h, axis=0)
    pos = tl.minimum(tl.sum((cum <= r).to(tl.int32), axis=0), NB - 1)
    size = tl.sum(tl.where(j == pos, h, 0), axis=0)
    before = tl.sum(tl.where(j == pos, cum, 0), axis=0) - size
    return NB - 1 - pos, r - before, size


@triton.jit
def _locate_layer(
    seg, hist, prefix, rank_in, rank, active, flags, t_hi, t_lo, skip_hi, end_hi, take_lo, S,
    NBINS: tl.constexpr, WIDTH: tl.constexpr, SHARED: tl.constexpr, APPEND: tl.constexpr,
    REL: tl.constexpr, FINAL: tl.constexpr,
):
    """Scan of one digit level for layer ``seg`` (both boundaries), on the device: find the
    boundary digits, reduce the ranks (``rank_in`` -> ``rank``; the first level reads the
    plan's ranks), and set (or, ``APPEND``, extend) ``prefix``.
    ``SHARED``: the exact first-digit histogram, one row per layer; ``flags[S + seg]``
    gets the layer's candidate count (both boundary buckets, once if they coincide), and
    an inactive layer (empty band) gets its final thresholds (it may have no candidates, so
    no later level need run for it).
    ``REL``: the digits are relative to ``prefix`` (the range starts): add them.
    ``FINAL``: the prefixes are now the exact boundary keys; write the thresholds and tie
    limits the compaction applies."""
    act = tl.load(active + seg) != 0
    if SHARED:
        row_hi = hist + seg.to(tl.int64) * NBINS
        row_lo = row_hi
    else:
        row_hi = hist + (2 * seg).to(tl.int64) * NBINS
        row_lo = row_hi + NBINS
    d_hi, r_hi, s_hi = _locate_row(row_hi, tl.load(rank_in + 2 * seg), NBINS, 1 << WIDTH)
    d_lo, r_lo, s_lo = _locate_row(row_lo, tl.load(rank_in + 2 * seg + 1), NBINS, 1 << WIDTH)
    if SHARED:
        n_cand = s_hi + tl.where(d_lo != d_hi, s_lo, 0)
        tl.store(flags + S + seg, tl.where(act, n_cand, 0))
    if APPEND:
        p_hi = (tl.load(prefix + 2 * seg) << WIDTH) | d_hi
        p_lo = (tl.load(prefix + 2 * seg + 1) << WIDTH) | d_lo
    elif REL:
        p_hi = tl.load(prefix + 2 * seg) + d_hi
        p_lo = tl.load(prefix + 2 * seg + 1) + d_lo
    else:
        p_hi = d_hi.to(tl.int64)
        p_lo = d_lo.to(tl.int64)
    p_hi = tl.where(act, p_hi, -1)  # a layer with an empty band matches no key
    p_lo = tl.where(act, p_lo, -1)
    tl.store(prefix + 2 * seg, p_hi)
    tl.store(prefix + 2 * seg + 1, p_lo)
    tl.store(rank + 2 * seg, r_hi)
    tl.store(rank + 2 * seg + 1, r_lo)
    if FINAL or SHARED:  # SHARED: the final values of an inactive layer (active: rewritten)
        same = p_hi == p_lo  # both boundaries in one tie group: ordinals in [skip, take]
        tl.store(t_hi + seg, p_hi)  # -1 when inactive: keys are >= 0, nothing kept
        tl.store(t_lo + seg, tl.where(same | (~act), 0x7FFFFFFFFFFFFFFF, p_lo))
        tl.store(skip_hi + seg, r_hi)
        tl.store(end_hi + seg, tl.where(same, r_lo, 1 << 62))
        tl.store(take_lo + seg, r_lo)


@triton.jit
def _locate_kernel(
    hist, prefix, rank_in, rank, active, flags, t_hi, t_lo, skip_hi, end_hi, take_lo, S,
    NBINS: tl.constexpr, WIDTH: tl.constexpr, SHARED: tl.constexpr, APPEND: tl.constexpr,
    REL: tl.constexpr, FINAL: tl.constexpr,
):
    """:func:`_locate_layer` of every layer, one program each."""
    _locate_layer(tl.program_id(0), hist, prefix, rank_in, rank, active, flags, t_hi, t_lo,
                  skip_hi, end_hi, take_lo, S, NBINS, WIDTH, SHARED, APPEND, REL, FINAL)


@triton.jit
def _scan_layer(
    seg, sb_cnt, seg_sbf, seg_nsb, offsets, skip_hi, end_hi, take_lo,
    sb_ord_hi, sb_ord_lo, sb_out, SCAN: tl.constexpr,
):
    """Exclusive prefix sums over the superblocks of layer ``seg`` (``sb_cnt``: packed
    21-bit sums of their blocks' counts): the ordinal of each superblock's first T_hi / T_lo
    tie, and its first output slot (kept = strictly inside, plus the ties whose ordinals
    fall in the kept range; the kept ties of consecutive blocks form one ordinal range, so
    the count is additive). The write pass finishes the sums inside a superblock. Within a
    layer in int32 (a layer has fewer than 2^31 elements), the output slot in int64.
    Reads the count kernels' atomics through L2 (``.cg``)."""
    b0 = tl.load(seg_sbf + seg)
    nb = tl.load(seg_nsb + seg).to(tl.int32)
    # tie limits clamped into int32 (ordinals are < 2^31): end_hi may be 2^62
    skip = tl.minimum(tl.load(skip_hi + seg), 0x7FFFFFFF).to(tl.int32)
    endh = tl.minimum(tl.load(end_hi + seg), 0x7FFFFFFE).to(tl.int32)
    take = tl.minimum(tl.load(take_lo + seg), 0x7FFFFFFE).to(tl.int32)
    carry_h = nb * 0
    carry_l = nb * 0
    carry_k = tl.load(offsets + seg)
    for t in range(0, nb, SCAN):
        i = t + tl.arange(0, SCAN)
        m = i < nb
        b = b0 + i
        pk = tl.load(sb_cnt + b, mask=m, other=0, cache_modifier=".cg")
        c0 = (pk & 0x1FFFFF).to(tl.int32)
        ch = ((pk >> 21) & 0x1FFFFF).to(tl.int32)
        cl = (pk >> 42).to(tl.int32)
        oh = carry_h + tl.cumsum(ch, axis=0) - ch
        ol = carry_l + tl.cumsum(cl, axis=0) - cl
        kh = tl.maximum(tl.minimum(oh + ch, endh + 1) - tl.maximum(oh, skip), 0)
        kl = tl.maximum(tl.minimum(ol + cl, take + 1) - ol, 0)
        k = c0 + kh + kl
        ok = carry_k + (tl.cumsum(k, axis=0) - k).to(tl.int64)
        tl.store(sb_ord_hi + b, oh.to(tl.int64), mask=m)
        tl.store(sb_ord_lo + b, ol.to(tl.int64), mask=m)
        tl.store(sb_out + b, ok, mask=m)
        carry_h += tl.sum(ch, axis=0)
        carry_l += tl.sum(cl, axis=0)
        carry_k += tl.sum(k, axis=0).to(tl.int64)


@triton.jit
def _scan_kernel(
    sb_cnt, seg_sbf, seg_nsb, offsets, skip_hi, end_hi, take_lo, sb_ord_hi, sb_ord_lo, sb_out,
    SCAN: tl.constexpr,
):
    """:func:`_scan_layer` of every layer, one program each."""
    _scan_layer(tl.program_id(0), sb_cnt, seg_sbf, seg_nsb, offsets, skip_hi, end_hi, take_lo,
                sb_ord_hi, sb_ord_lo, sb_out, SCAN)


@triton.jit
def _block_prefix(pid, seg, cnt, num_blocks, seg_first, seg_sbf, skip_hi, end_hi, take_lo,
                  sb_ord_hi, sb_ord_lo, sb_out, SUPER: tl.constexpr):
    """Block ``pid``'s first T_hi tie ordinal, first T_lo tie ordinal and first output slot:
    its superblock's (from :func:`_scan_layer`) plus the counts of the blocks before it in
    the superblock (at most ``SUPER - 1``: one packed int64 sum)."""
    r = pid - tl.load(seg_first + seg)
    sb = tl.load(seg_sbf + seg) + r // SUPER
    j = tl.arange(0, SUPER)
    bj = pid - r % SUPER + j
    mj = j < r % SUPER
    pk = (tl.load(cnt + bj, mask=mj, other=0).to(tl.int64)
          | (tl.load(cnt + num_blocks + bj, mask=mj, other=0).to(tl.int64) << 21)
          | (tl.load(cnt + 2 * num_blocks + bj, mask=mj, other=0).to(tl.int64) << 42))
    tot = tl.sum(pk, axis=0)
    oh0 = tl.load(sb_ord_hi + sb)
    ol0 = tl.load(sb_ord_lo + sb)
    oh = oh0 + ((tot >> 21) & 0x1FFFFF)
    ol = ol0 + (tot >> 42)
    skip, endh = tl.load(skip_hi + seg), tl.load(end_hi + seg)
    kh = tl.maximum(tl.minimum(oh, endh + 1) - tl.maximum(oh0, skip), 0)
    kl = tl.maximum(tl.minimum(ol, tl.load(take_lo + seg) + 1) - ol0, 0)
    return oh, ol, tl.load(sb_out + sb) + (tot & 0x1FFFFF) + kh + kl


@triton.jit
def _write_kernel(
    g_ptrs, e_ptrs, d_ptrs, seg_n, blk_seg, blk_start,
    t_hi, t_lo, skip_hi, end_hi, take_lo, seg_first, seg_sbf, sb_ord_hi, sb_ord_lo, sb_out,
    o_ptrs, cnt, num_blocks, stop, full_ids, n_full, part_ids, n_part,
    DT: tl.constexpr, KIND: tl.constexpr, HAS_E: tl.constexpr, ALIGNED: tl.constexpr,
    WRITE_SPARSE: tl.constexpr, WRITE_E: tl.constexpr, WRITE_DENSE: tl.constexpr,
    BLOCK_: tl.constexpr, PERSIST: tl.constexpr, STAGES: tl.constexpr, SUPER: tl.constexpr,
):
    """Phase 3b: ordered compaction of each block with the tie rule at both thresholds.
    Writes nothing at all when ``stop[0]`` is set (the sampled path found a NaN in the call:
    the launcher raises after the pass, and no residual or input may have changed).
    The full blocks, then the partial ones, one program per block or, ``PERSIST``, a few
    programs per SM looping over them with pipelined loads (as :func:`_gather_kernel`)."""
    a = (g_ptrs, e_ptrs, d_ptrs, seg_n, blk_seg, blk_start, t_hi, t_lo, skip_hi, end_hi,
         take_lo, seg_first, seg_sbf, sb_ord_hi, sb_ord_lo, sb_out, o_ptrs, cnt, num_blocks,
         stop)
    if PERSIST:
        pid, nprog = tl.program_id(0), tl.num_programs(0)
        for t in tl.range(pid, n_full, nprog, num_stages=STAGES):
            _write_block(tl.load(full_ids + t), 1, a, DT, KIND, HAS_E, ALIGNED, WRITE_SPARSE,
                         WRITE_E, WRITE_DENSE, BLOCK_, SUPER)
        for t in range(pid, n_part, nprog):
            _write_block(tl.load(part_ids + t), 2, a, DT, KIND, HAS_E, ALIGNED, WRITE_SPARSE,
                         WRITE_E, WRITE_DENSE, BLOCK_, SUPER)
    else:  # one program per block: the full blocks, then the partial ones
        pid = tl.program_id(0)
        if pid < n_full:
            _write_block(tl.load(full_ids + pid), 1, a, DT, KIND, HAS_E, ALIGNED,
                         WRITE_SPARSE, WRITE_E, WRITE_DENSE, BLOCK_, SUPER)
        else:
            _write_block(tl.load(part_ids + (pid - n_full)), 2, a, DT, KIND, HAS_E, ALIGNED,
                         WRITE_SPARSE, WRITE_E, WRITE_DENSE, BLOCK_, SUPER)


@triton.jit
def _write_block(
    pid, FULL: tl.constexpr, a,
    DT: tl.constexpr, KIND: tl.constexpr, HAS_E: tl.constexpr, ALIGNED: tl.constexpr,
    WRITE_SPARSE: tl.constexpr, WRITE_E: tl.constexpr, WRITE_DENSE: tl.constexpr,
    BLOCK_: tl.constexpr, SUPER: tl.constexpr,
):
    """Block ``pid`` of :func:`_write_kernel`. ``FULL``: 1 the block lies inside its layer
    in the plan, so the loads are unmasked (vectorised, pipelined) and the stores carry
    one block-wide flag (the tail's size may be 0: a layer the sample missed, or the call
    may ``stop``); 2 masked. ``a``: the kernel's runtime arguments."""
    (g_ptrs, e_ptrs, d_ptrs, seg_n, blk_seg, blk_start, t_hi, t_lo, skip_hi, end_hi, take_lo,
     seg_first, seg_sbf, sb_ord_hi, sb_ord_lo, sb_out, o_ptrs, cnt, num_blocks, stop) = a
    seg = tl.load(blk_seg + pid)
    offs, m, n, start = _block_offsets(blk_start, seg_n, pid, seg, BLOCK_)
    n = tl.where(tl.load(stop) != 0, 0, n)  # a NaN in the call: write nothing
    g_base = _base(g_ptrs, seg, DT, ALIGNED)
    e_base = _base(e_ptrs, seg, DT, ALIGNED)
    if FULL == 1:
        # uniform over the block, so the stores under it stay vectorised
        m = tl.full([BLOCK_], 1, tl.int1) & (start <= n - BLOCK_)
        v = _load_v(g_base, e_base, offs, m, KIND, HAS_E, False)
    else:
        m = offs < n
        v = _load_v(g_base, e_base, offs, m, KIND, HAS_E, True)
    key = _key(v, KIND)
    th, tlo = _key_thresholds(t_hi, t_lo, seg, KIND != 1)
    kept = m & (key > tlo) & (key < th)
    # The tie rule only in blocks holding a boundary key (``cnt[1..2]``: usually one block
    # per layer for each boundary): the ordinal of each tied entry inside its tie group =
    # entries of the group before it in index order (earlier blocks: ``ord_*0``, this block:
    # exclusive cumsum of both tie flags at once, in 16-bit halves; BLOCK_ <= 2048).
    if tl.load(cnt + num_blocks + pid) + tl.load(cnt + 2 * num_blocks + pid) > 0:
        ord_hi0, ord_lo0, _first = _block_prefix(
            pid, seg, cnt, num_blocks, seg_first, seg_sbf, skip_hi, end_hi, take_lo,
            sb_ord_hi, sb_ord_lo, sb_out, SUPER)
        eq_hi = m & (key == th)
        eq_lo = m & (key == tlo)
        e2 = eq_hi.to(tl.int32) | (eq_lo.to(tl.int32) << 16)
        c2 = tl.reshape(_excl_cumsum(_rows(e2, BLOCK_, _VEC[KIND])), [BLOCK_])
        ord_hi = ord_hi0 + (c2 & 0xFFFF)
        ord_lo = ord_lo0 + (c2 >> 16)
        kept = (
            kept
            | (eq_hi & (ord_hi >= tl.load(skip_hi + seg)) & (ord_hi <= tl.load(end_hi + seg)))
            | (eq_lo & (ord_lo <= tl.load(take_lo + seg)))
        )
    if WRITE_SPARSE:  # (the dense outputs need no slot: only tie blocks take the prefix)
        _oh, _ol, first = _block_prefix(pid, seg, cnt, num_blocks, seg_first, seg_sbf,
                                        skip_hi, end_hi, take_lo, sb_ord_hi, sb_ord_lo,
                                        sb_out, SUPER)
        kept2 = _rows(kept, BLOCK_, _VEC[KIND])
        cs = _excl_cumsum(kept2.to(tl.int32))  # int32 slot inside the block's output range
        # output tensors by pointer table (like the inputs), so that a captured CUDA graph
        # writes into each call's fresh outputs
        out_idx = tl.load(o_ptrs).to(tl.pointer_type(tl.int64))
        out_val = tl.load(o_ptrs + 1).to(tl.pointer_type(DT))
        tl.store((out_idx + first) + cs, _rows(offs, BLOCK_, _VEC[KIND]).to(tl.int64),
                 mask=kept2)
        tl.store((out_val + first) + cs, _rows(v, BLOCK_, _VEC[KIND]), mask=kept2)
    zero = tl.zeros_like(v)  # +0.0
    if WRITE_E:
        tl.store(e_base + offs, tl.where(kept, zero, v), mask=m)
    if WRITE_DENSE:
        d_base = _base(d_ptrs, seg, DT, ALIGNED)
        tl.store(d_base + offs, tl.where(kept, v, zero), mask=m)


# --------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------
def _block_table(ns: Sequence[int], size: int) -> Tuple[List[int], List[int], List[int], List[int]]:
    """``(segment of block, start of block, first block of segment, blocks of segment)``."""
    seg, start, first, count = [], [], [], []
    for s, n in enumerate(ns):
        nb = -(-n // size)
        first.append(len(seg))
        count.append(nb)
        seg.extend([s] * nb)
        start.extend(range(0, nb * size, size))
    return seg, start, first, count


def _to_device(parts: Sequence[Sequence[int]], device: torch.device) -> List[Tensor]:
    """Int64 tensors of ``parts`` on ``device`` in one (pinned, asynchronous) transfer.
    (Through an ``array``: half the host time of ``torch.tensor`` on a list of a few
    hundred pointers.)"""
    flat = array.array("q", [x for p in parts for x in p])
    host = torch.frombuffer(flat, dtype=torch.int64) if flat else torch.empty(0, dtype=torch.int64)
    if device.type == "cuda":
        host = host.pin_memory().to(device, non_blocking=True)
    return list(torch.split(host, [len(p) for p in parts]))


@dataclass
class _Plan:
    """Everything about a call that depends only on the layer sizes, ``top`` and ``keep``
    (cached: a training loop calls with the same shapes every step, and building the block
    tables in Python costs ~1 ms for 25M elements)."""

    counts: List[Tuple[int, int]]
    out_off: List[int]  # host copy of ``offsets``
    total: int
    n_chunks: int
    n_blocks: int
    n_cap_chunks: int
    n_cap: int
    n_total: int
    seg_n: Tensor
    chk_seg: Tensor
    chk_start: Tensor
    chk_nchk: Tensor  # [S] data chunks of each layer
    blk_seg: Tensor
    blk_start: Tensor
    seg_first: Tensor
    seg_nblk: Tensor
    rank0: Tensor  # [2S] ranks of the upper and lower boundary of each layer
    offsets: Tensor  # [S+1] first output slot of each layer
    active: Tensor  # [S] 1 when the layer's band is non-empty
    cap: Tensor  # [S] sampled path: candidate slot capacity of each layer
    cap_off: Tensor  # [S+1] sampled path: first slot entry of each layer
    cap_seg: Tensor  # sampled path: chunk table over the slots
    cap_start: Tensor
    cap_nchk: Tensor  # [S] sampled path: slot chunks of each layer
    seg_sbf: Tensor  # [S] first superblock (SUPER consecutive blocks) of each layer
    seg_nsb: Tensor  # [S] superblocks of each layer
    full_ids: Tensor  # blocks that lie inside their layer (persistent passes)
    part_ids: Tensor  # the others (the last block of a layer whose size BLOCK does not divide)
    zero: Tensor  # [1] a zero flag (the write pass's ``stop`` on the exact path)
    n_full: int = 0
    n_part: int = 0
    n_sb: int = 0
    key: tuple = ()  # the cache key (shapes, fractions, device, tuning constants)


_PLANS: "OrderedDict[tuple, _Plan]" = OrderedDict()
_PLAN_CACHE_SIZE = 16


def _capacity(n: int) -> int:
    """Candidate slot of a layer on the sampled path: the whole layer when it was sampled
    entirely (its boundary buckets may hold everything), else a quarter of it."""
    return n if n <= SAMPLE else max(SAMPLE, n // CAND_FRACTION)


def _plan(ns: Tuple[int, ...], top: float, keep: float, device: torch.device) -> _Plan:
    # per stream: a plan's tables are copied on the stream that built it, and freed into
    # that stream's pool when the cache drops the plan
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (ns, float(top), float(keep), str(device), stream, SAMPLE, CAND_FRACTION, BLOCK,
           CAND_CHUNK, CHUNK, SUPER)
    plan = _PLANS.get(key)
    if plan is not None:
        _PLANS.move_to_end(key)
        return plan
    counts = [band_counts(n, top, keep) for n in ns]
    out_off = [0]
    for _, kk in counts:
        out_off.append(out_off[-1] + kk)
    c_seg, c_start, _, c_count = _block_table(ns, CHUNK)
    b_seg, b_start, b_first, b_count = _block_table(ns, BLOCK)
    rows = []
    for kt, kk in counts:
        rows += [kt, kt + kk - 1] if kk > 0 else [0, 0]
    caps = [_capacity(n) for n in ns]
    cap_off = [0]
    for c in caps:
        cap_off.append(cap_off[-1] + c)
    p_seg, p_start, _, p_count = _block_table(caps, CAND_CHUNK)
    sb_count = [-(-nb // SUPER) for nb in b_count]
    sb_first = [0]
    for c in sb_count[:-1]:
        sb_first.append(sb_first[-1] + c)
    sb_first = sb_first[:len(ns)]
    full_ids = [i for i, (s, b) in enumerate(zip(b_seg, b_start)) if b + BLOCK <= ns[s]]
    part_ids = [i for i, (s, b) in enumerate(zip(b_seg, b_start)) if b + BLOCK > ns[s]]
    tensors = _to_device(
        [ns, c_seg, c_start, c_count, b_seg, b_start, b_first, b_count, rows, out_off,
         [int(kk > 0) for _, kk in counts], caps, cap_off, p_seg, p_start, p_count,
         sb_first, sb_count, full_ids, part_ids, [0]], device)
    plan = _Plan(counts, out_off, out_off[-1], len(c_seg), len(b_seg), len(p_seg), cap_off[-1],
                 sum(ns), *tensors, n_full=len(full_ids), n_part=len(part_ids),
                 n_sb=sum(sb_count), key=key)
    _PLANS[key] = plan
    if len(_PLANS) > _PLAN_CACHE_SIZE:
        _PLANS.popitem(last=False)
    return plan


def band_multi_triton(
    gs: Sequence[Tensor],
    top: float,
    keep: float,
    *,
    residuals: Optional[Sequence[Tensor]] = None,
    dense: Optional[Sequence[Tensor]] = None,
    want_sparse: bool = True,
    nan_message=None,
    candidates: Optional[bool] = None,
    sampled: Optional[bool] = None,
) -> Optional[Tuple[Tensor, Tensor, Tensor]]:
    """Run the phases over the layers ``gs`` (contiguous, one dtype and device).

    ``residuals`` (contiguous, like ``gs``): error feedback, ``v = g + e`` and ``e`` is
    overwritten with ``v`` minus the band. ``dense`` (contiguous, like ``gs``; may be ``gs``
    itself): receives ``v`` with everything outside the band zeroed. ``want_sparse``:
    return ``(indices int64, values, offsets int64[len(gs)+1])`` concatenated over layers.
    ``nan_message(i)``: the ``ValueError`` text when layer ``i`` holds a NaN; nothing is
    written before that check. ``sampled`` / ``candidates``: force or forbid the sampled
    path and the candidate buffer (None: ``sampled`` from ``SAMPLED_MIN_TOTAL``,
    ``candidates`` from the boundary buckets' size); every path gives the same bits.
    With ``USE_CUDA_GRAPHS`` the sampled path is captured once per (shapes, dtype, mode)
    and replayed (see :func:`_graph_launch`).
    """
    if BLOCK > 2048:  # the kernels pack per-block counts into 12/16-bit fields
        raise ValueError(f"BLOCK must be at most 2048, got {BLOCK}")
    if SUPER & (SUPER - 1) or SUPER * BLOCK >= 1 << 21:  # packed in 21-bit fields
        raise ValueError(f"SUPER must be a power of two with SUPER * BLOCK < 2^21, got "
                         f"{SUPER} * {BLOCK}")
    S = len(gs)
    dtype, device = gs[0].dtype, gs[0].device
    ns = tuple(g.numel() for g in gs)
    for i, n in enumerate(ns):
        if n > MAX_LAYER:
            raise ValueError(
                f"tensor {i} of the call has {n} elements; the Triton kernels index a layer "
                f"with 32-bit integers and take at most {MAX_LAYER} (2^31 - 2^16) elements "
                "per tensor: split it into smaller layers, or run it through "
                "dgp_kernels.ops.reference (pure torch, any size, slower)")
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "dgp ops cannot run inside a CUDA graph capture: each call reads a few flags "
                "back to the host (NaN, sample misses). Call them outside the capture; "
                "DGP_CUDA_GRAPHS=1 makes dgp_kernels capture and replay its own kernels.")
        if device.index != torch.cuda.current_device():
            # Triton launches on the current device and stream: run on the tensors' own
            with torch.cuda.device(device):
                return band_multi_triton(
                    gs, top, keep, residuals=residuals, dense=dense, want_sparse=want_sparse,
                    nan_message=nan_message, candidates=candidates, sampled=sampled)
    has_e = residuals is not None
    plan = _plan(ns, top, keep, device)
    total = plan.total
    e_list = residuals if has_e else gs
    d_list = dense if dense is not None else gs
    i64 = dict(dtype=torch.int64, device=device)
    if want_sparse:
        out_idx = torch.empty(total, **i64)
        out_val = torch.empty(total, dtype=dtype, device=device)
    else:
        out_idx = torch.empty(1, **i64)
        out_val = torch.empty(1, dtype=dtype, device=device)
    offsets = plan.offsets.clone()  # returned to the caller: not the cached tensor
    if sampled is None:
        sampled = sum(ns) >= SAMPLED_MIN_TOTAL and dtype in SAMPLED_DTYPES
    sampled = bool(sampled and plan.n_blocks)
    table = [t.data_ptr() for x in (gs, e_list, d_list) for t in x]
    cfg = _Mode(dtype, has_e, dense is not None, want_sparse and total > 0,
                functools.reduce(operator.or_, table, 0) & 15 == 0, FUSE_TAILS)
    table += [out_idx.data_ptr(), out_val.data_ptr()]
    flags = None
    if sampled and USE_CUDA_GRAPHS and device.type == "cuda":
        with _GRAPH_LOCK:  # a graph's table, workspaces and flags are shared by its replays
            flags = _graph_launch(plan, table, S, cfg)
            if flags is not None:
                missed = _sampled_outcome(flags, S, nan_message)
    if flags is None:  # eager: the exact path, graphs off, or a graph key's first call
        ptrs = _to_device([table], device)[0]
        flags = _launch(plan, ptrs, S, cfg, sampled, nan_message, candidates)
        missed = _sampled_outcome(flags, S, nan_message) if flags is not None else []
    if missed:  # the layers whose sample missed, on the exact path, into their slots
        pick = lambda xs: None if xs is None else [xs[i] for i in missed]  # noqa: E731
        sub = band_multi_triton(
            pick(gs), top, keep, residuals=pick(residuals), dense=pick(dense),
            want_sparse=want_sparse, nan_message=lambda j: nan_message(missed[j]),
            sampled=False,
        )
        if want_sparse:
            sub_off = 0
            for i in missed:
                a, b = plan.out_off[i], plan.out_off[i + 1]
                out_idx[a:b] = sub[0][sub_off:sub_off + b - a]
                out_val[a:b] = sub[1][sub_off:sub_off + b - a]
                sub_off += b - a
    return (out_idx, out_val, offsets) if want_sparse else None


_SM_COUNT: dict = {}


def _persistent(plan: _Plan):
    """Grid, block-list arguments and constexprs of a gather/write launch: one program per
    block, or (``PERSISTENT``) ``PERSISTENT`` programs per SM over the full/partial lists."""
    ids = (plan.full_ids, plan.n_full, plan.part_ids, plan.n_part)
    if not PERSISTENT:
        return (plan.n_blocks,), ids, dict(PERSIST=False, STAGES=1)
    device = plan.seg_n.device
    if device.type == "cuda":
        if device not in _SM_COUNT:
            _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
        programs = PERSISTENT * _SM_COUNT[device]
    else:  # the interpreter: a few programs, so that each loops over several blocks
        programs = PERSISTENT
    return ((max(1, min(plan.n_blocks, programs)),), ids,
            dict(PERSIST=True, STAGES=PIPELINE_STAGES))


def _maxnreg(n: int, device: torch.device) -> dict:
    """The launch option that caps a kernel's registers (none in the interpreter)."""
    return {"maxnreg": int(n)} if n and device.type == "cuda" else {}


@dataclass(frozen=True)
class _Mode:
    """What a call computes, beyond the shapes: selects the kernel variants."""

    dtype: torch.dtype
    has_e: bool
    dense: bool
    sparse: bool  # write indices and values
    aligned: bool  # every data pointer 16-byte aligned
    fuse: bool = False  # FUSE_TAILS when the call was made


def _launch(plan: _Plan, ptrs: Tensor, S: int, cfg: _Mode, sampled: bool, nan_message,
            candidates: Optional[bool]) -> Optional[Tensor]:
    """Queue every phase of one call. ``ptrs``: int64 table of the data pointers (g, e,
    dense: S each) and of the two outputs. Returns the sampled path's flags (read by
    :func:`_sampled_outcome`), or None on the exact path, which checks NaN itself (its one
    sync). No sync on the sampled path, so it can be captured in a CUDA graph.
    ``cfg.fuse``: each per-layer step runs in the last program of the launch before it
    (:func:`_last_program`) instead of a launch of its own."""
    dtype = cfg.dtype
    kind, key_bits, widths_cand, widths_data = _KINDS[dtype]
    total, n_blocks = plan.total, plan.n_blocks
    has_e, fuse = cfg.has_e, cfg.fuse
    ptrs = torch.split(ptrs, [S, S, S, 2])
    common = dict(DT=_TL_DTYPE[dtype], KIND=kind, HAS_E=has_e, ALIGNED=cfg.aligned,
                  num_warps=NUM_WARPS)
    if sampled:  # no device->host sync until the write pass is queued
        st = _boundaries_sampled(plan, ptrs, S, dtype, key_bits, common, fuse)
    else:  # exact histogram (one sync: NaN check, candidate count)
        st = _boundaries_full(plan, ptrs, S, dtype, key_bits, common, nan_message,
                              candidates, fuse)
    if n_blocks == 0 or (total == 0 and not has_e and not cfg.dense):
        return st.flags
    g_ptrs, e_ptrs, d_ptrs, o_ptrs = ptrs
    thresholds = st.thresholds
    t_hi, t_lo, skip_hi, end_hi, take_lo = thresholds
    widths = widths_cand if st.cand_key is not None else widths_data
    if st.flags is not None:
        # Layers the sample missed have size 0 in the tail (neither read nor written), and
        # a NaN anywhere in the call stops the write pass altogether.
        seg_n, stop = st.tail_n, st.flags[3 * S:]
    else:
        seg_n, stop = plan.seg_n, plan.zero

    # Phase 2', the remaining digits: exact boundary keys, over the candidate slots or,
    # when the boundary buckets are huge, over the data.
    pshift = key_bits - FIRST_DIGIT_BITS
    if st.cand_key is not None:
        level_hists = st.cand_levels
    else:  # (the data fallback: wider digits, histograms of their own)
        sizes = _level_sizes(S, widths)
        level_hists = torch.split(
            torch.zeros(sum(sizes), dtype=torch.int32, device=plan.seg_n.device), sizes)
    if st.cand_key is not None:
        src = (st.cand_n, st.c_seg, st.c_start, st.cand_off, st.cand_key)
        n_refine, nchk, chunk = st.c_chunks, st.c_nchk, CAND_CHUNK
        # the keys matching the prefix after two digits (a few percent of the candidates)
        # are copied out at level 1, and the later levels read only those
        compact_at = 1 if COMPACT_CANDIDATES and len(widths) > 2 else -1
    else:
        src = (plan.seg_n, plan.chk_seg, plan.chk_start, plan.offsets, level_hists[0])
        n_refine, nchk, chunk = plan.n_chunks, plan.chk_nchk, CHUNK
        compact_at = -1
    compacted = None
    if compact_at >= 0 and n_refine:
        compacted = (st.fill2, torch.empty_like(st.cand_key))
    dummy = (st.rank, st.rank)  # (cand2, fill2) of the levels that copy nothing
    for level, w in enumerate(widths):
        # >= 32 bins: older triton lowers tl.histogram with a warp-ballot scheme that
        # asserts num_bins % 32 == 0 (the 4-bit digit of 16-bit floats uses 16 of 32).
        nbins = max(1 << w, 32)
        h = level_hists[level]
        final = level == len(widths) - 1
        if n_refine:
            # ``flags`` of the locate is only written at the SHARED level: ``st.rank`` fills in
            compact = level == compact_at and compacted is not None
            _refine_kernel[(n_refine,)](
                g_ptrs, e_ptrs, *src, st.prefix, st.prefix, h,
                st.tick[2], nchk, level + st.refine_levels, st.prefix, st.rank, plan.active,
                st.rank, *thresholds, S, *(compacted[::-1] if compact else dummy),
                FROM_CAND=st.cand_key is not None, REL=False, PSHIFT=pshift,
                DSHIFT=pshift - w, DMASK=(1 << w) - 1, NBINS=nbins, TILE_=TILE, CHUNK_=chunk,
                FUSE=fuse, WIDTH=w, APPEND=True, FINAL=final, COMPACT=compact, KEYRANGE=False,
                **common,
            )
            if compact:  # later levels: the copied keys, in the same slots
                src = (compacted[0], *src[1:4], compacted[1])
        if not fuse:
            _locate_kernel[(S,)](
                h, st.prefix, st.rank, st.rank, plan.active, st.rank, *thresholds, S,
                NBINS=nbins, WIDTH=w, SHARED=False, APPEND=True, REL=False, FINAL=final,
            )
        pshift -= w

    # Phase 3a: per block #strictly inside (T_lo, T_hi), #== T_hi, #== T_lo; then per layer
    # the tie ordinal and output slot of each block (prefix sums, no per-element atomics).
    sb_args = (plan.seg_sbf, plan.seg_nsb, st.sb_cnt, plan.n_sb, plan.offsets, skip_hi, end_hi,
               take_lo, st.sb_ord[0], st.sb_ord[1], st.sb_ord[2])
    scan_args = (st.tick[3], plan.seg_first, plan.seg_nblk, *sb_args)
    if st.cand_key is not None:
        _cand_count_kernel[(n_blocks,)](
            seg_n, plan.blk_seg, st.blk_cand[0], st.blk_cand[1], st.cand_key, t_hi, t_lo,
            st.cnt, n_blocks, *scan_args, BLOCK_=BLOCK, KEY32=key_bits <= 31, FUSE=fuse,
            SCAN=FUSED_SCAN_TILE, SUPER=SUPER, num_warps=NUM_WARPS,
        )
    else:
        _count_kernel[(n_blocks,)](
            g_ptrs, e_ptrs, plan.seg_n, plan.blk_seg, plan.blk_start, t_hi, t_lo, st.cnt,
            n_blocks, *scan_args, BLOCK_=BLOCK, FUSE=fuse, SCAN=FUSED_SCAN_TILE, SUPER=SUPER,
            **common,
        )
    if not fuse:
        _scan_kernel[(S,)](
            st.sb_cnt, plan.seg_sbf, plan.seg_nsb, *sb_args[4:], SCAN=SCAN_TILE,
            num_warps=SCAN_WARPS,
        )

    # Phase 3b: ordered compaction + residual / dense writes.
    persist = _persistent(plan)
    _write_kernel[persist[0]](
        g_ptrs, e_ptrs, d_ptrs, seg_n, plan.blk_seg, plan.blk_start,
        *thresholds, plan.seg_first, plan.seg_sbf, *st.sb_ord, o_ptrs, st.cnt, n_blocks, stop,
        *persist[1], WRITE_SPARSE=cfg.sparse, WRITE_E=has_e, WRITE_DENSE=cfg.dense,
        BLOCK_=BLOCK, SUPER=SUPER, **persist[2], **common,
        **_maxnreg(WRITE_MAXNREG, g_ptrs.device),
    )
    return st.flags


# --------------------------------------------------------------------------------------
# CUDA graphs (opt-in): the sampled path has no sync, so a call is one graph replay
# --------------------------------------------------------------------------------------
USE_CUDA_GRAPHS = os.environ.get("DGP_CUDA_GRAPHS", "0") == "1"
_GRAPH_CACHE_SIZE = 4


@dataclass
class _Graph:
    graph: "torch.cuda.CUDAGraph"
    table: Tensor  # the pointer table the graph reads: refilled before each replay
    flags: Tensor  # the sampled path's flags the graph writes
    plan: _Plan  # keeps the plan's tensors (read by the graph) alive


_GRAPHS: "OrderedDict[tuple, _Graph]" = OrderedDict()
# Launch constants a captured graph has baked in (beyond the plan's key and the mode).
_TUNING = ("NUM_WARPS", "TILE", "CHUNK", "SCAN_TILE", "SCAN_WARPS", "FUSED_SCAN_TILE",
           "SAMPLE_SPLIT", "PERSISTENT", "PIPELINE_STAGES", "GATHER_MAXNREG", "WRITE_MAXNREG",
           "REL_FIRST_DIGIT", "REL_BINS", "SAMPLE_SIGMAS", "SAMPLE_SLACK", "CAND_MIN",
           "FINE_BITS", "COMPACT_CANDIDATES", "VALIDATE_LANES")


def _tuning() -> tuple:
    g = globals()
    return tuple(g[name] for name in _TUNING)
_GRAPH_LOCK = threading.Lock()
_GRAPH_SEEN: "OrderedDict[tuple, bool]" = OrderedDict()


def _graph_launch(plan: _Plan, table: List[int], S: int, cfg: _Mode) -> Optional[Tensor]:
    """Replay the captured sampled path for this (plan, mode), capturing it on the second
    call (the first runs eagerly, so every kernel is compiled before a capture). The
    pointers of the call's tensors go into the graph's static table by one asynchronous
    copy; outputs are written through that table into the call's fresh tensors; the
    workspaces live in the graph's private memory pool (about a quarter of the elements
    as candidate keys, plus per-block tables), one pool per cached graph
    (``_GRAPH_CACHE_SIZE``). Returns the graph's flags, or None (run eagerly). The caller
    holds ``_GRAPH_LOCK`` until it has read the flags, so host threads take turns; the key
    includes the stream, so calls on different streams use different graphs."""
    key = (plan.key, cfg, _tuning(), torch.cuda.current_stream().cuda_stream)
    entry = _GRAPHS.get(key)
    host = torch.tensor(table, dtype=torch.int64).pin_memory()
    if entry is None:
        if key not in _GRAPH_SEEN:
            _GRAPH_SEEN[key] = True
            if len(_GRAPH_SEEN) > 4 * _GRAPH_CACHE_SIZE:
                _GRAPH_SEEN.popitem(last=False)
            return None
        static = torch.empty(len(table), dtype=torch.int64, device=plan.seg_n.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            flags = _launch(plan, static, S, cfg, True, None, None)
        entry = _Graph(graph, static, flags, plan)
        _GRAPHS[key] = entry
        if len(_GRAPHS) > _GRAPH_CACHE_SIZE:
            _GRAPHS.popitem(last=False)
    else:
        _GRAPHS.move_to_end(key)
    entry.table.copy_(host, non_blocking=True)
    entry.graph.replay()
    return entry.flags


@dataclass
class _State:
    """The device state of one call between its phases (views into a few workspaces)."""

    prefix: Tensor  # [2S] rows 2s: upper boundary, 2s+1: lower boundary
    rank: Tensor  # [2S] rank of each boundary inside what is left to resolve
    thresholds: Tuple[Tensor, ...]  # [S] each: t_hi, t_lo, skip_hi, end_hi, take_lo
    cnt: Tensor  # int32 [3, n_blocks] per-block counts
    sb_cnt: Tensor  # [n_sb] zeroed: packed count sums of each superblock (_finish_count)
    sb_ord: Tensor  # [3, n_sb] first T_hi / T_lo tie ordinal, first output slot
    tick: Tensor  # int32 [4, S] zeroed tickets of the fused tails (see _last_program)
    cand_levels: Tuple[Tensor, ...]  # zeroed histograms of the candidate digit levels
    fill2: Tensor  # [S] zeroed: keys each layer copies at the compacting level
    refine_levels: int = 0  # candidate digit levels already resolved (the ticket counts on)
    # candidate slots (None: refine and count over the data)
    cand_n: Optional[Tensor] = None  # [S] candidates in each slot
    c_seg: Optional[Tensor] = None  # chunk table over the slots
    c_start: Optional[Tensor] = None
    c_chunks: int = 0
    c_nchk: Optional[Tensor] = None  # [S] chunks of each slot
    cand_off: Optional[Tensor] = None  # [S+1] first entry of each slot
    cand_key: Optional[Tensor] = None
    blk_cand: Optional[Tensor] = None  # [2, n_blocks] each block's first candidate, count
    # sampled path only
    flags: Optional[Tensor] = None  # [3S+1]: NaN, missed, wide per layer; the call's NaN
    tail_n: Optional[Tensor] = None  # [S] layer sizes for the tail (0: missed)


def _level_sizes(S: int, widths: Sequence[int]) -> List[int]:
    """Entries of each digit level's histograms (two rows of >= 32 bins per layer)."""
    return [2 * S * max(1 << w, 32) for w in widths]


def _new_state(plan: _Plan, S: int, device, dtype: torch.dtype, zeros32: int,
               zeros64: int = 0) -> Tuple[_State, Tensor, Tensor]:
    """Fresh state in a few workspaces (two zeroed ones: one memset each), plus zeroed
    int32 and int64 workspaces of ``zeros32`` / ``zeros64`` entries for the caller
    (histograms, flags)."""
    nb = max(plan.n_blocks, 1)
    nsb = max(plan.n_sb, 1)
    levels = _level_sizes(S, _KINDS[dtype][2])  # the candidate digit levels
    w64 = torch.empty(9 * S + 3 * nsb, dtype=torch.int64, device=device)
    z32 = torch.zeros(4 * S + sum(levels) + zeros32, dtype=torch.int32, device=device)
    z64 = torch.zeros(nsb + S + zeros64, dtype=torch.int64, device=device)
    st = _State(
        prefix=w64[:2 * S], rank=w64[2 * S:4 * S],
        thresholds=tuple(w64[4 * S:9 * S].view(5, S)),
        cnt=torch.empty((3, nb), dtype=torch.int32, device=device),
        sb_cnt=z64[:nsb], sb_ord=w64[9 * S:].view(3, nsb), tick=z32[:4 * S].view(4, S),
        cand_levels=torch.split(z32[4 * S:4 * S + sum(levels)], levels),
        fill2=z64[nsb:nsb + S])
    return st, z32[4 * S + sum(levels):], z64[nsb + S:]


def _boundaries_full(plan, ptrs, S, dtype, key_bits, common, nan_message, candidates,
                     fuse) -> _State:
    """Phase 1 (exact first-digit histogram), the sync, and phase 2's gather when the
    boundary buckets are small."""
    device = plan.seg_n.device
    g_ptrs, e_ptrs = ptrs[0], ptrs[1]
    shift = key_bits - FIRST_DIGIT_BITS
    nb1 = 1 << FIRST_DIGIT_BITS
    st, hist, _ = _new_state(plan, S, device, dtype, S * nb1)
    flags = torch.zeros(2 * S, dtype=torch.int64, device=device)  # [NaN, candidates] per layer
    locate = (st.prefix, plan.rank0, st.rank, plan.active)
    if plan.n_chunks:
        _hist_kernel[(plan.n_chunks,)](
            g_ptrs, e_ptrs, plan.seg_n, plan.chk_seg, plan.chk_start, hist, flags,
            st.tick[0], plan.chk_nchk, *locate, *st.thresholds, S,
            INF_KEY=_INF_KEY[dtype], SHIFT=shift, NBINS=nb1, TILE_=TILE, CHUNK_=CHUNK,
            FUSE=fuse, WIDTH=FIRST_DIGIT_BITS, **common,
        )
    if not fuse or not plan.n_chunks:  # (fused: layers without elements have no chunk)
        _locate_kernel[(S,)](
            hist, *locate[:3], plan.active, flags, *st.thresholds, S,
            NBINS=nb1, WIDTH=FIRST_DIGIT_BITS, SHARED=True, APPEND=False, REL=False, FINAL=False,
        )
    host_flags = flags.tolist()  # the one device->host sync of a call
    for i, f in enumerate(host_flags[:S]):
        if f:
            raise ValueError(nan_message(i))
    cand_ns = host_flags[S:]
    n_cand = sum(cand_ns)
    if candidates is None:
        candidates = n_cand <= max(CAND_MIN, plan.n_total // CAND_FRACTION)
    if not candidates or plan.n_blocks == 0:
        return st
    cc_seg, cc_start, _, cc_count = _block_table(cand_ns, CAND_CHUNK)
    slot = [0]
    for c in cand_ns:
        slot.append(slot[-1] + c)
    cand_n, c_seg, c_start, c_nchk, cand_off = _to_device(
        [cand_ns, cc_seg, cc_start, cc_count, slot], device)
    cand_key = torch.empty(max(n_cand, 1), dtype=torch.int64 if key_bits > 31 else torch.int32,
                           device=device)
    blk_cand = torch.empty((2, plan.n_blocks), dtype=torch.int64, device=device)
    fill = torch.zeros(S, dtype=torch.int64, device=device)
    persist = _persistent(plan)
    _gather_kernel[persist[0]](
        g_ptrs, e_ptrs, plan.seg_n, plan.blk_seg, plan.blk_start, st.prefix, st.prefix, st.cnt,
        blk_cand[0], blk_cand[1], cand_off, cand_n, fill, cand_key, fill, flags, S,
        st.tick[1], plan.seg_first, plan.seg_nblk, st.rank, plan.active, fill, plan.n_blocks,
        *persist[1], SAMPLED=False, INF_KEY=_INF_KEY[dtype], SHIFT=shift, BLOCK_=BLOCK,
        FUSE=False, LANES=VALIDATE_LANES, WIDE_MISSES=False, **persist[2], **common,
        **_maxnreg(GATHER_MAXNREG, device),
    )
    st.cand_n, st.c_seg, st.c_start, st.c_chunks, st.c_nchk = (
        cand_n, c_seg, c_start, len(cc_seg), c_nchk)
    st.cand_off, st.cand_key, st.blk_cand = cand_off, cand_key, blk_cand
    return st


def _boundaries_sampled(plan, ptrs, S, dtype, key_bits, common, fuse) -> _State:
    """Sampled path: first-digit histogram of a sample of each layer, digit ranges that hold
    the boundaries with high probability, then one full read (gather) that collects the
    candidates, the counts and the NaN flags, and the first candidate digit. No
    device->host sync: a layer whose boundary fell outside its range (or, on the relative
    first-digit path, whose range is too wide) is marked missed on the device and skipped
    by the tail; :func:`_sampled_outcome` reads the flags once the write pass is queued.
    The state's ``flags``: ``[NaN, missed, wide]`` per layer and the call's NaN flag;
    ``tail_n``: the tail's layer sizes."""
    device = plan.seg_n.device
    g_ptrs, e_ptrs = ptrs[0], ptrs[1]
    shift = key_bits - FIRST_DIGIT_BITS
    nb1 = 1 << FIRST_DIGIT_BITS
    i64 = dict(dtype=torch.int64, device=device)
    rel = REL_FIRST_DIGIT
    nbins = REL_BINS if rel else nb1
    # zeroed workspaces: tickets, sample histograms, refine histograms | flags, slot
    # fills, tail sizes
    fine = FINE_BITS if FINE_BITS <= shift else 0
    nh = S * nb1 + S * (nb1 << fine) if fine else S * nb1  # coarse rows, then fine rows
    st, ws32, ws64 = _new_state(plan, S, device, dtype, nh + 2 * S * nbins,
                                5 * S + 1 + 2 * S * VALIDATE_LANES)
    hist, h = ws32[:nh], ws32[nh:].view(2 * S, nbins)
    totals, ws64 = ws64[:2 * S * VALIDATE_LANES], ws64[2 * S * VALIDATE_LANES:]
    flags, fill, tail_n = ws64[:3 * S + 1], ws64[3 * S + 1:4 * S + 1], ws64[4 * S + 1:]
    ranges = torch.empty((3, 2 * S), **i64)  # key ranges [a, b], first digit of a
    range_args = (plan.rank0, st.rank, plan.active, ranges[0], ranges[1], ranges[2],
                  flags[2 * S:])
    range_consts = dict(SIGMAS=SAMPLE_SIGMAS, SLACK=SAMPLE_SLACK, REL=REL_BINS, FINE=fine)
    _sample_kernel[(S, SAMPLE_SPLIT)](
        g_ptrs, e_ptrs, plan.seg_n, hist, st.tick[0], *range_args, SHIFT=shift, NBINS=nb1,
        SAMPLE_=SAMPLE, SPLIT=SAMPLE_SPLIT, TILE_=TILE, FUSE=fuse, **range_consts, **common,
    )
    if not fuse:
        _range_kernel[(S,)](hist, plan.seg_n, *range_args, NBINS=nb1, SAMPLE_=SAMPLE,
                            SHIFT=shift, **range_consts)
    cand_key = torch.empty(max(plan.n_cap, 1), dtype=torch.int64 if key_bits > 31 else torch.int32,
                           device=device)
    blk_cand = torch.empty((2, plan.n_blocks), **i64)
    validate = (plan.seg_first, plan.seg_nblk, st.rank, plan.active, tail_n)
    persist = _persistent(plan)
    # (persistent: the validation stays a launch of its own; inside the block loop its
    # ticket and branch keep the compiler from pipelining the loads)
    fuse_validate = fuse and not persist[2]["PERSIST"]
    _gather_kernel[persist[0]](
        g_ptrs, e_ptrs, plan.seg_n, plan.blk_seg, plan.blk_start, ranges[0], ranges[1], st.cnt,
        blk_cand[0], blk_cand[1], plan.cap_off, plan.cap, fill, cand_key, totals, flags, S,
        st.tick[1], *validate, plan.n_blocks, *persist[1], SAMPLED=True,
        INF_KEY=_INF_KEY[dtype], SHIFT=shift, BLOCK_=BLOCK, FUSE=fuse_validate,
        LANES=VALIDATE_LANES, WIDE_MISSES=rel, **persist[2], **common,
        **_maxnreg(GATHER_MAXNREG, device),
    )
    if not fuse_validate:
        _validate_kernel[(S,)](
            totals, ranges[0], st.rank, plan.active, plan.cap, fill, flags, S, plan.seg_n,
            tail_n, LANES=VALIDATE_LANES, WIDE_MISSES=rel,
        )
    # First digit of the candidates, inside each boundary's range: relative to the range
    # start in REL_BINS bins (ranges wider than that were marked missed), or over all
    # first digits when REL_FIRST_DIGIT is off.
    if rel:
        st.prefix = ranges[2]  # the locate adds each relative digit to its range's first digit
    width = REL_BINS.bit_length() - 1 if rel else FIRST_DIGIT_BITS
    locate = (st.prefix, st.rank, plan.active, st.rank, *st.thresholds, S)
    if plan.n_cap_chunks:
        _refine_kernel[(plan.n_cap_chunks,)](
            g_ptrs, e_ptrs, fill, plan.cap_seg, plan.cap_start, plan.cap_off, cand_key,
            ranges[0], ranges[1], h, st.tick[2], plan.cap_nchk, 0, *locate, st.rank, st.rank,
            FROM_CAND=True, REL=rel, PSHIFT=shift, DSHIFT=shift, DMASK=nb1 - 1, NBINS=nbins,
            TILE_=TILE, CHUNK_=CAND_CHUNK, FUSE=fuse, WIDTH=width, APPEND=False, FINAL=False,
            COMPACT=False, KEYRANGE=True, **common,
        )
    if not fuse:
        _locate_kernel[(S,)](
            h, st.prefix, st.rank, *locate[1:], NBINS=nbins, WIDTH=width, SHARED=False,
            APPEND=False, REL=rel, FINAL=False,
        )
    st.refine_levels = 1
    st.cand_n, st.c_seg, st.c_start, st.c_chunks, st.c_nchk = (
        fill, plan.cap_seg, plan.cap_start, plan.n_cap_chunks, plan.cap_nchk)
    st.cand_off, st.cand_key, st.blk_cand = plan.cap_off, cand_key, blk_cand
    st.flags, st.tail_n = flags, tail_n
    return st


def _record_sampled(missed: List[int]) -> None:
    """Called after every sampled call with the layers whose sample missed (a hook for
    tests and ``bench/bench_triton.py``, which count misses)."""


def _sampled_outcome(flags: Tensor, S: int, nan_message) -> List[int]:
    """The sampled path's one device->host sync: raise on a NaN (the write pass wrote
    nothing), else return the layers whose sample missed (to rerun on the exact path)."""
    host = flags[:2 * S].tolist()
    for i, f in enumerate(host[:S]):
        if f:
            raise ValueError(nan_message(i))
    missed = [i for i, f in enumerate(host[S:]) if f]
    _record_sampled(missed)
    return missed


# --------------------------------------------------------------------------------------
# Wrappers: one per dgp:: op (same arguments and results as the reference).
# --------------------------------------------------------------------------------------
_NAN = "{} contains NaN; DGP cannot rank NaN gradients"
_NAN_EF = (
    "{} contains NaN (a NaN gradient or residual, or inf - inf); DGP cannot rank NaN gradients"
)


def _flat(t: Tensor) -> Tensor:
    """Contiguous flat view (a copy only for non-contiguous inputs)."""
    return t.contiguous().view(-1)


def select_triton(g: Tensor, top: float = 0.05, keep: float = 0.20) -> Tuple[Tensor, Tensor]:
    """Triton ``dgp::select``: ``(indices int64[k_keep] ascending, values g.dtype[k_keep])``."""
    check_fractions(top, keep)
    check_grad(g, "g")
    idx, val, _ = band_multi_triton([_flat(g)], top, keep, nan_message=lambda i: _NAN.format("g"))
    return idx, val


def select_ef_triton(
    g: Tensor, residual: Tensor, top: float = 0.05, keep: float = 0.20
) -> Tuple[Tensor, Tensor]:
    """Triton ``dgp::select_ef``: band of ``v = g + residual``; ``residual <- v`` minus the band
    (kept positions ``+0.0``). ``residual`` is untouched when ``v`` holds a NaN."""
    check_fractions(top, keep)
    check_grad(g, "g")
    check_residual(g, residual, "residual")
    e = _flat(residual)  # a view when contiguous: written in place
    idx, val, _ = band_multi_triton(
        [_flat(g)], top, keep, residuals=[e],
        nan_message=lambda i: _NAN_EF.format("g + residual"),
    )
    if e.data_ptr() != residual.data_ptr() or not residual.is_contiguous():
        residual.copy_(e.view(residual.shape))
    return idx, val


def prune_triton(g: Tensor, top: float = 0.05, keep: float = 0.20) -> Tensor:
    """Triton ``dgp::prune``: new contiguous tensor like ``g`` holding only the band."""
    check_fractions(top, keep)
    check_grad(g, "g")
    out = torch.empty(g.shape, dtype=g.dtype, device=g.device)
    band_multi_triton(
        [_flat(g)], top, keep, dense=[out.view(-1)], want_sparse=False,
        nan_message=lambda i: _NAN.format("g"),
    )
    return out


def prune_inplace_triton(g: Tensor, top: float = 0.05, keep: float = 0.20) -> None:
    """Triton ``dgp::prune_``: zero every entry of ``g`` outside the band, in place."""
    check_fractions(top, keep)
    check_grad(g, "g")
    work = _flat(g)
    band_multi_triton(
        [work], top, keep, dense=[work], want_sparse=False,
        nan_message=lambda i: _NAN.format("g"),
    )
    if not g.is_contiguous():
        g.copy_(work.view(g.shape))


def select_multi_triton(
    gs: Sequence[Tensor], top: float = 0.05, keep: float = 0.20
) -> Tuple[Tensor, Tensor, Tensor]:
    """Triton ``dgp::select_multi``: every layer in one launch per phase; returns
    ``(indices, values, offsets)`` as the reference (layer-local indices)."""
    check_fractions(top, keep)
    check_grads(gs, "gs")
    if not gs:
        return reference.select_multi(gs, top, keep)
    return band_multi_triton(
        [_flat(g) for g in gs], top, keep, nan_message=lambda i: _NAN.format(f"gs[{i}]")
    )


def select_ef_multi_triton(
    gs: Sequence[Tensor], residuals: Sequence[Tensor], top: float = 0.05, keep: float = 0.20
) -> Tuple[Tensor, Tensor, Tensor]:
    """Triton ``dgp::select_ef_multi``: fused error feedback for every layer; all residuals
    are untouched when any layer's ``g + residual`` holds a NaN."""
    check_fractions(top, keep)
    check_grads(gs, "gs")
    check_residuals(gs, residuals)
    if not gs:
        return reference.select_ef_multi(gs, residuals, top, keep)
    es = [_flat(e) for e in residuals]
    out = band_multi_triton(
        [_flat(g) for g in gs], top, keep, residuals=es,
        nan_message=lambda i: _NAN_EF.format(f"gs[{i}] + residuals[{i}]"),
    )
    for e, res in zip(es, residuals):
        if not res.is_contiguous():
            res.copy_(e.view(res.shape))
    return out


IMPLS = {
    "select": select_triton,
    "select_ef": select_ef_triton,
    "prune": prune_triton,
    "prune_": prune_inplace_triton,
    "select_multi": select_multi_triton,
    "select_ef_multi": select_ef_multi_triton,
}
