"""Compile every Triton kernel variant for a GPU target without a GPU.

    python -m dgp_kernels.kernels.triton.compile_check            # sm_90 (H100)
    python -m dgp_kernels.kernels.triton.compile_check --arch 80  # A100
    python -m dgp_kernels.kernels.triton.compile_check --resources --match "write float32"

The interpreter (``TRITON_INTERPRET=1``) checks what the kernels compute, not that they
lower to PTX: this runs Triton's real compiler (and the ptxas bundled with the triton
wheel) on each (dtype, error feedback, output) variant the launcher can ask for, so a
GPU-only compile error shows up in CI. Must run with ``TRITON_INTERPRET`` unset (the test
starts it in a subprocess). Prints one line per variant; exit status 1 if any fails.
``--resources`` adds what ptxas gave each variant (registers, stack = spills, local
memory: they decide how many programs share an SM) and its SASS instruction count (static,
both branches of every ``if``), read from the cubin with the ``cuobjdump`` in the triton
wheel; ``--match`` keeps the variants whose label holds the text; ``--set BLOCK=1024``
(repeatable) changes a module constant of ``select`` first. A static view of the kernels
on a machine without a GPU, not a timing.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

# dtype name -> (torch dtype, triton pointer type of the data, of the candidate keys)
_DTYPES = {
    "float32": ("fp32", "i32"),
    "float64": ("fp64", "i64"),
    "float16": ("fp16", "i32"),
    "bfloat16": ("bf16", "i32"),
}


def _variants(ts, torch):
    """(kernel, signature, constexprs, label) for every variant ``band_multi_triton`` uses."""
    i64 = "*i64"
    out = []
    fusions = (False, True)  # FUSE_TAILS off / on
    thr = dict(t_hi=i64, t_lo=i64, skip_hi=i64, end_hi=i64, take_lo=i64, S="i32")
    blocks = dict(num_blocks="i32", full_ids=i64, n_full="i32", part_ids=i64, n_part="i32")
    sb_sig = dict(offsets=i64, skip_hi=i64, end_hi=i64, take_lo=i64, sb_ord_hi=i64,
                  sb_ord_lo=i64, sb_out=i64)
    scan_sig = dict(tick="*i32", seg_first=i64, seg_nblk=i64, seg_sbf=i64, seg_nsb=i64,
                    sb_cnt=i64, n_sb="i32", **sb_sig)
    for dname, (vt, kt) in _DTYPES.items():
        dtype = getattr(torch, dname)
        kind, key_bits, widths_cand, widths_data = ts._KINDS[dtype]
        shift = key_bits - ts.FIRST_DIGIT_BITS
        for has_e in (True, False):
            c = dict(DT=ts._TL_DTYPE[dtype], KIND=kind, HAS_E=has_e, ALIGNED=True)
            unaligned = dict(c, ALIGNED=False)
            tag = f"{dname} ef={int(has_e)}"
            for fuse in fusions:
                out.append((ts._hist_kernel, dict(
                    g_ptrs=i64, e_ptrs=i64, seg_n=i64, chk_seg=i64, chk_start=i64, hist="*i32",
                    nan_flag=i64, tick="*i32", chk_nchk=i64, prefix=i64, rank0=i64, rank=i64,
                    active=i64, **thr), dict(c, INF_KEY=ts._INF_KEY[dtype], SHIFT=shift,
                    NBINS=1 << ts.FIRST_DIGIT_BITS, TILE_=ts.TILE, CHUNK_=ts.CHUNK, FUSE=fuse,
                    WIDTH=ts.FIRST_DIGIT_BITS), f"hist {tag} fuse={int(fuse)}"))
            for sampled, cc, fuse, persist in (
                    (False, c, False, False), (True, c, False, False),
                    (True, unaligned, False, False), (True, c, True, False),
                    (False, c, False, True), (True, c, False, True)):
                out.append((ts._gather_kernel, dict(
                    g_ptrs=i64, e_ptrs=i64, seg_n=i64, blk_seg=i64, blk_start=i64,
                    range_a=i64, range_b=i64, cnt="*i32", blk_cstart=i64, blk_ccount=i64,
                    cand_off=i64, cand_cap=i64, cand_fill=i64, cand_key="*" + kt,
                    totals=i64, flags=i64, S="i32", tick="*i32", seg_first=i64,
                    seg_nblk=i64, rank=i64, active=i64, tail_n=i64, **blocks),
                    dict(cc, SAMPLED=sampled, INF_KEY=ts._INF_KEY[dtype], SHIFT=shift,
                         BLOCK_=ts.BLOCK, FUSE=fuse, LANES=ts.VALIDATE_LANES,
                         WIDE_MISSES=ts.REL_FIRST_DIGIT, PERSIST=persist,
                         STAGES=ts.PIPELINE_STAGES if persist else 1),
                    f"gather {tag} sampled={int(sampled)} aligned={int(cc['ALIGNED'])} "
                    f"fuse={int(fuse)} persist={int(persist)}"))
            for fuse in fusions:
                out.append((ts._sample_kernel, dict(
                    g_ptrs=i64, e_ptrs=i64, seg_n=i64, hist="*i32", tick="*i32", rank0=i64,
                    rank=i64, active=i64, range_a=i64, range_b=i64, rstart=i64, wide=i64),
                    dict(c, SHIFT=shift, NBINS=1 << ts.FIRST_DIGIT_BITS, SAMPLE_=ts.SAMPLE,
                         SPLIT=ts.SAMPLE_SPLIT, TILE_=ts.TILE, FUSE=fuse,
                         SIGMAS=ts.SAMPLE_SIGMAS, SLACK=ts.SAMPLE_SLACK, REL=ts.REL_BINS,
                         FINE=ts.FINE_BITS),
                    f"sample {tag} fuse={int(fuse)}"))
            refine_sig = dict(g_ptrs=i64, e_ptrs=i64, seg_n=i64, chk_seg=i64, chk_start=i64,
                              cand_off=i64, cand_key="*" + kt, prefix_a=i64, prefix_b=i64,
                              hist="*i32", tick="*i32", chk_nchk=i64, level="i32", prefix=i64,
                              rank=i64, active=i64, flags=i64, **thr, cand2=i64, fill2=i64)
            for rel in (False, True):  # sampled path: first digit of the candidates
                nb = ts.REL_BINS if rel else 1 << ts.FIRST_DIGIT_BITS
                for fuse in fusions:
                    out.append((ts._refine_kernel, refine_sig, dict(
                        c, FROM_CAND=True, REL=rel, PSHIFT=shift, DSHIFT=shift,
                        DMASK=(1 << ts.FIRST_DIGIT_BITS) - 1, NBINS=nb, TILE_=ts.TILE,
                        CHUNK_=ts.CAND_CHUNK, FUSE=fuse, WIDTH=nb.bit_length() - 1,
                        APPEND=False, FINAL=False, COMPACT=False, KEYRANGE=True),
                        f"refine {tag} first digit of candidates rel={int(rel)} fuse={int(fuse)}"))
            for from_cand, widths in ((True, widths_cand), (False, widths_data)):
                pshift = shift
                for j, w in enumerate(widths):
                    compact = from_cand and j == 1 and len(widths) > 2
                    sig = dict(refine_sig, cand2="*" + kt) if compact else refine_sig
                    for fuse in fusions:
                        out.append((ts._refine_kernel, sig,
                            dict(c, FROM_CAND=from_cand, REL=False, PSHIFT=pshift,
                                 DSHIFT=pshift - w, DMASK=(1 << w) - 1, NBINS=max(1 << w, 32),
                                 TILE_=ts.TILE, CHUNK_=ts.CAND_CHUNK if from_cand else ts.CHUNK,
                                 FUSE=fuse, WIDTH=w, APPEND=True, FINAL=j == len(widths) - 1,
                                 COMPACT=compact, KEYRANGE=False),
                            f"refine {tag} digit={w} cand={int(from_cand)} level={j} "
                            f"fuse={int(fuse)} compact={int(compact)}"))
                    pshift -= w
            for fuse in fusions:
                out.append((ts._count_kernel, dict(
                    g_ptrs=i64, e_ptrs=i64, seg_n=i64, blk_seg=i64, blk_start=i64, t_hi=i64,
                    t_lo=i64, counts="*i32", num_blocks="i32", **scan_sig),
                    dict(c, BLOCK_=ts.BLOCK, FUSE=fuse, SCAN=ts.FUSED_SCAN_TILE, SUPER=ts.SUPER),
                    f"count {tag} fuse={int(fuse)}"))
            modes = [(True, has_e, False, c, False), (True, has_e, False, unaligned, False),
                     (True, has_e, False, c, True)]
            modes += [] if has_e else [(False, False, True, c, False), (False, False, True, c, True)]
            for sparse, write_e, write_dense, cc, persist in modes:
                out.append((ts._write_kernel, dict(
                    g_ptrs=i64, e_ptrs=i64, d_ptrs=i64, seg_n=i64, blk_seg=i64, blk_start=i64,
                    t_hi=i64, t_lo=i64, skip_hi=i64, end_hi=i64, take_lo=i64, seg_first=i64,
                    seg_sbf=i64, sb_ord_hi=i64, sb_ord_lo=i64, sb_out=i64, o_ptrs=i64,
                    cnt="*i32", num_blocks="i32", stop=i64, full_ids=i64, n_full="i32",
                    part_ids=i64, n_part="i32"),
                    dict(cc, WRITE_SPARSE=sparse, WRITE_E=write_e, WRITE_DENSE=write_dense,
                         BLOCK_=ts.BLOCK, PERSIST=persist, SUPER=ts.SUPER,
                         STAGES=ts.PIPELINE_STAGES if persist else 1),
                    f"write {tag} sparse={int(sparse)} aligned={int(cc['ALIGNED'])} "
                    f"persist={int(persist)}"))
            if has_e:  # the dtype-independent kernels, once per key width
                for fuse in fusions:
                    out.append((ts._cand_count_kernel, dict(
                        seg_n=i64, blk_seg=i64, blk_cstart=i64, blk_ccount=i64,
                        cand_key="*" + kt, t_hi=i64, t_lo=i64, cnt="*i32", num_blocks="i32",
                        **scan_sig), dict(BLOCK_=ts.BLOCK, KEY32=dname != "float64",
                                          FUSE=fuse, SCAN=ts.FUSED_SCAN_TILE,
                                          SUPER=ts.SUPER),
                        f"cand_count {dname} fuse={int(fuse)}"))
    loc = dict(hist="*i32", prefix=i64, rank_in=i64, rank=i64, active=i64, flags=i64, **thr)
    f = ts.FIRST_DIGIT_BITS
    rel_w = ts.REL_BINS.bit_length() - 1
    for nbins, width, shared, append, rel, final in sorted({
        (max(1 << w, 32), w, False, True, False, j == len(ws) - 1)
        for v in ts._KINDS.values() for ws in v[2:] for j, w in enumerate(ws)
    }) + [(1 << f, f, True, False, False, False), (1 << f, f, False, False, False, False),
          (ts.REL_BINS, rel_w, False, False, True, False)]:
        out.append((ts._locate_kernel, loc, dict(
            NBINS=nbins, WIDTH=width, SHARED=shared, APPEND=append, REL=rel, FINAL=final),
            f"locate width={width} shared={int(shared)} append={int(append)} rel={int(rel)} "
            f"final={int(final)}"))
    out.append((ts._range_kernel, dict(hist="*i32", seg_n=i64, rank0=i64, rank=i64, active=i64,
                range_a=i64, range_b=i64, rstart=i64, wide=i64), dict(
                NBINS=1 << f, SAMPLE_=ts.SAMPLE, SIGMAS=ts.SAMPLE_SIGMAS, SLACK=ts.SAMPLE_SLACK,
                REL=ts.REL_BINS, FINE=ts.FINE_BITS, SHIFT=31 - f), "range"))
    out.append((ts._validate_kernel, dict(totals=i64, range_a=i64, rank=i64, active=i64,
                cand_cap=i64, cand_fill=i64, flags=i64, S="i32", seg_n=i64, tail_n=i64),
                dict(LANES=ts.VALIDATE_LANES, WIDE_MISSES=ts.REL_FIRST_DIGIT), "validate"))
    out.append((ts._scan_kernel, dict(sb_cnt=i64, seg_sbf=i64, seg_nsb=i64, **sb_sig),
                dict(SCAN=ts.SCAN_TILE), "scan"))
    return out


def _resources(cubin: bytes, triton) -> str:
    """``regs=.. stack=.. local=.. sass=..`` of one cubin (cuobjdump from the triton wheel;
    spilled registers show as stack bytes)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+).*?STACK:(\d+).*?LOCAL:(\d+)", usage)
    n_ins = len(re.findall(r"^\s+/\*[0-9a-f]{4}\*/", sass, re.M))
    if not m:
        return f"sass={n_ins}"
    return f"regs={m.group(1)} stack={m.group(2)} local={m.group(3)} sass={n_ins}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability (90)")
    parser.add_argument("--resources", action="store_true",
                        help="also print registers, stack, spills and SASS instructions")
    parser.add_argument("--match", default="", help="only the variants whose label holds this")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=INT",
                        help="set a module constant of select first, e.g. BLOCK=1024")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_check: unset TRITON_INTERPRET (the interpreter compiles nothing)")
        return 2
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import select as ts

    for item in args.set:
        name, _, value = item.partition("=")
        if not hasattr(ts, name) or not value:
            print(f"compile_check: --set {item!r}: no such constant NAME=INT in select")
            return 2
        setattr(ts, name, type(getattr(ts, name))(int(value)))
    target = GPUTarget("cuda", args.arch, 32)
    failures = 0
    for fn, sig, consts, label in _variants(ts, torch):
        if args.match not in label:
            continue
        t0 = time.perf_counter()
        src = ASTSource(
            fn=fn,
            signature={**sig, **{k: "constexpr" for k in consts}},
            constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
        )
        try:
            # as the launcher: the per-layer scan with SCAN_WARPS, locate/range/validate with
            # triton's default 4 warps, the data passes with NUM_WARPS
            if fn is ts._scan_kernel:
                warps = ts.SCAN_WARPS
            elif fn in (ts._locate_kernel, ts._range_kernel, ts._validate_kernel):
                warps = 4
            else:
                warps = ts.NUM_WARPS
            k = triton.compile(src, target=target, options={"num_warps": warps})
            extra = f" {_resources(k.asm['cubin'], triton)}" if args.resources else ""
            print(f"ok   sm_{args.arch} {label:<40} shared={k.metadata.shared:>6} B "
                  f"{time.perf_counter() - t0:.1f}s{extra}")
        except Exception as exc:  # report every failing variant, not just the first
            failures += 1
            print(f"FAIL sm_{args.arch} {label}: {type(exc).__name__}: {exc}")
    print(f"{failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
