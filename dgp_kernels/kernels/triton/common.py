"""Shared ``@triton.jit`` helpers and dtype tables of the Triton backend.

Keys: ``bits(v) & ~sign`` orders ``|v|`` (31 bits for float32, 15 for float16/bfloat16,
63 for float64); a key above the key of +inf is a NaN. Boundary state: each layer has two
boundaries (row ``2*seg``: the upper one, rank ``k_top``; row ``2*seg+1``: the lower one,
rank ``k_top + k_keep - 1``), each a key window ``[lo, hk]`` of width at most ``2^rem``
that holds the boundary key, and the boundary's rank inside the window counted from its
largest key. Every refinement level splits the window into ``2^w`` digits
``(key - lo) >> (rem - w)`` and keeps the digit holding the rank, until ``rem == 0``.
"""

from __future__ import annotations

import inspect

import torch
import triton
import triton.language as tl

FIRST_DIGIT_BITS = 11  # the first digit covers a float's exponent (and 3 mantissa bits)
# The data passes index a layer in int32 (half the instructions of int64 indexing); block,
# tile and chunk ends must stay below 2^31 too.
MAX_LAYER = (1 << 31) - (1 << 16)
# Copies of each layer's totals that the sampled gather adds its block counts into (block
# i into copy i % LANES: fewer same-address atomics), summed by the validation.
LANES = 8
# A sampled key range spanning more first digits than this is too wide (the layer is rerun
# on the exact path): it bounds the first refinement level's digit width.
REL_BINS = tl.constexpr(32)
# Bits of the sampled path's first refinement level (its histogram has 2^RANGE_BITS bins;
# Triton 3.6 lowers tl.histogram to warp ballots whose cost grows with the bin count:
# three 2048/1024-bin levels over the 3.7M candidates of a 25M tensor took 1.67 ms on an
# H200, 32 bins about 0.03 ms per level).
RANGE_BITS = tl.constexpr(8)
TAIL_BITS = tl.constexpr(5)  # digit bits of the refinement levels that one program runs (32 bins)

# dtype -> (KIND, key bits, digit widths after the first over candidates, over the data):
# each set of widths sums to key bits - FIRST_DIGIT_BITS. Over the data (the exact path's
# fallback for huge boundary buckets) every level is a full read, so digits stay wide.
KINDS = {
    torch.float32: (0, 31, (5, 5, 5, 5), (10, 10)),
    torch.float64: (1, 63, (8, 8, 8, 8, 8, 8, 4), (11, 11, 11, 11, 8)),
    torch.float16: (2, 15, (4,), (4,)),
    torch.bfloat16: (3, 15, (4,), (4,)),
}
TL_DTYPE = {
    torch.float32: tl.float32,
    torch.float64: tl.float64,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
}
INF_KEY = {  # key of +inf: a larger key is a NaN
    torch.float32: 0x7F800000,
    torch.float64: 0x7FF0000000000000,
    torch.float16: 0x7C00,
    torch.bfloat16: 0x7F80,
}
# entries of one 16-byte vector of the data per KIND (float32, float64, float16, bfloat16)
VEC = tl.constexpr((4, 2, 8, 8))
if "mask" not in inspect.signature(tl.histogram).parameters:
    # (3.6 and 3.9 have it; register() then leaves CUDA tensors to the reference)
    raise ImportError(f"triton {triton.__version__}: tl.histogram takes no mask=; the Triton "
                      "kernels of dgp_kernels need a newer triton")


@triton.jit
def bf16_to_f32(x):
    """Exact bfloat16 -> float32: the 16 bits become the high half of the float32."""
    return ((x.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)


@triton.jit
def f32_to_bf16_rne(x):
    """float32 -> bfloat16 rounded to nearest even, in integers, as torch does it: a NaN
    becomes the quiet NaN 0x7FC0. (Adding the rounding bias to a NaN's bits can carry into
    the sign: the GPU's canonical NaN 0x7FFFFFFF would round to -0.0 and hide the NaN.)"""
    bits = x.to(tl.uint32, bitcast=True)
    r = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    r = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, r)
    return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def load_v(g_base, e_base, offs, m, KIND: tl.constexpr, HAS_E: tl.constexpr,
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
            v = f32_to_bf16_rne(bf16_to_f32(g) + bf16_to_f32(e))
        else:  # float32 / float64: one IEEE add
            v = g + e
    else:
        v = g
    return v


@triton.jit
def base(ptrs, seg, DT: tl.constexpr, ALIGNED: tl.constexpr):
    """Data pointer of layer ``seg`` from a pointer table; ``ALIGNED``: the launcher checked
    that every pointer of the call is 16-byte aligned, so tell the compiler (vector loads)."""
    p = tl.load(ptrs + seg).to(tl.pointer_type(DT))
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def key_of(v, KIND: tl.constexpr):
    """Sign-cleared bit pattern of ``v``: orders ``|v|`` (int32, int64 for float64)."""
    if KIND == 0:
        k = v.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    elif KIND == 1:
        k = v.to(tl.int64, bitcast=True) & 0x7FFFFFFFFFFFFFFF
    else:
        k = v.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF
    return k


@triton.jit
def rows(x, N: tl.constexpr, V: tl.constexpr):
    """The 1-D block ``x`` of ``N`` entries as a ``[N // V, V]`` matrix (row-major: no data
    moves). With ``V`` = the entries of one 16-byte vector load, a row is what one thread
    holds."""
    return tl.reshape(x, [N // V, V])


@triton.jit
def excl_cumsum(x2):
    """Exclusive prefix sums of the row-major entries of the int32 matrix ``x2`` (a
    :func:`rows` view): the rows' sums, their exclusive scan, plus the scan inside each
    row, so only one sum per row crosses threads. (``tl.cumsum`` of the 1-D block took the
    one-entry-per-thread layout of the scatter store it fed and moved key, mask and pointer
    through shared memory; sm_90, Triton 3.6, a full gather block: about 930 -> 660 SASS
    instructions.)"""
    rs = tl.sum(x2, axis=1)
    return (tl.cumsum(rs, axis=0) - rs)[:, None] + (tl.cumsum(x2, axis=1) - x2)


@triton.jit
def masked_histogram(d, m, NBINS: tl.constexpr, TILE_: tl.constexpr):
    """Histogram of ``d`` over the lanes where ``m``."""
    return tl.histogram(d, NBINS, mask=m)


@triton.jit
def last_program(tick, seg, target):
    """True in the one program that finishes layer ``seg``'s share of a launch (``target``
    = that share's program count - 1), which then runs the per-layer step that would
    otherwise be a launch of its own (a fused tail). The barrier orders this program's
    stores and atomics before its ticket; the ticket is an acq_rel atomic at GPU scope
    (release of this program's writes, acquire of the earlier programs'), and the tail
    reads their writes through L2 (``.cg`` loads): CUTLASS's ``__syncthreads(); thread 0:
    red.release.gpu`` arrival. No program waits for another, so the interpreter, which runs
    programs one after another, executes it as the GPU does. (The data atomics are all
    ``relaxed``: a default acq_rel atomic costs every thread a full GPU memory barrier.)"""
    tl.debug_barrier()
    return tl.atomic_add(tick + seg, 1) == target


@triton.jit
def locate_row(hrow, r, NBINS: tl.constexpr, NB):
    """Digit whose bucket holds rank ``r`` counting from the largest digit down (``NB``
    used bins of the row), ``r`` minus the entries of larger digits, and the bucket's
    size. Reads the row through L2 (``.cg``): other programs' atomics wrote it."""
    j = tl.arange(0, NBINS)
    h = tl.load(hrow + (NB - 1 - j), mask=j < NB, other=0, cache_modifier=".cg").to(tl.int64)
    cum = tl.cumsum(h, axis=0)
    pos = tl.minimum(tl.sum((cum <= r).to(tl.int32), axis=0), NB - 1)
    size = tl.sum(tl.where(j == pos, h, 0), axis=0)
    before = tl.sum(tl.where(j == pos, cum, 0), axis=0) - size
    return NB - 1 - pos, r - before, size


@triton.jit
def narrow(bnd, row, d, r, w, NB2):
    """Keep digit ``d`` of width ``w`` of boundary ``row``'s window and its rank ``r``:
    ``lo += d << (rem - w)``, ``hk = min(hk, lo + 2^(rem - w) - 1)``, ``rem -= w``.
    ``bnd``: int64 ``[4, NB2]`` rows lo, hk, rem, rank."""
    lo = tl.load(bnd + row)
    hk = tl.load(bnd + NB2 + row)
    rem = tl.load(bnd + 2 * NB2 + row)
    rem2 = rem - w
    lo2 = lo + (d.to(tl.int64) << rem2)
    hk2 = tl.minimum(hk, lo2 + (tl.full([], 1, tl.int64) << rem2) - 1)
    tl.store(bnd + row, lo2)
    tl.store(bnd + NB2 + row, hk2)
    tl.store(bnd + 2 * NB2 + row, rem2)
    tl.store(bnd + 3 * NB2 + row, r)


@triton.jit
def finish_layer(seg, bnd, thr, S, NB2):
    """Both boundary keys of layer ``seg`` are exact (``rem == 0``): write the thresholds and
    tie limits the write pass applies (``thr``: int64 ``[5, S]`` rows T_hi, T_lo, skip_hi,
    end_hi, take_lo). A boundary's rank inside its window is then its ordinal in its tie
    group (ties rank by ascending index): T_hi ties with ordinal >= skip_hi are kept, T_lo
    ties with ordinal <= take_lo; both limits when one tie group holds both boundaries."""
    p_hi = tl.load(bnd + 2 * seg)
    p_lo = tl.load(bnd + 2 * seg + 1)
    r_hi = tl.load(bnd + 3 * NB2 + 2 * seg)
    r_lo = tl.load(bnd + 3 * NB2 + 2 * seg + 1)
    same = p_hi == p_lo
    tl.store(thr + seg, p_hi)
    tl.store(thr + S + seg, tl.where(same, 0x7FFFFFFFFFFFFFFF, p_lo))
    tl.store(thr + 2 * S + seg, r_hi)
    tl.store(thr + 3 * S + seg, tl.where(same, r_lo, 1 << 62))
    tl.store(thr + 4 * S + seg, r_lo)
