"""Compile every device-codec kernel for a GPU target, **no GPU needed** (Triton's real
compiler and the ptxas of the triton wheel): catches what the interpreter accepts but the
compiler does not (types of loop-carried values, scalar control flow, reductions).

    python -m dgp_kernels.kernels.triton.codec_compile [--arch 90]

Must run without ``TRITON_INTERPRET`` (the interpreter compiles nothing: the tool checks
the kernels' type, never the environment).
"""

from __future__ import annotations

import argparse
import sys


def _variants():
    from . import codec_common as cc
    from . import codec_decode as cd
    from . import codec_encode as ce

    u8, i64, i32, f32 = "*u8", "*i64", "*i32", "*fp32"
    out = [
        (cc._crc_chunk_kernel, dict(buf=u8, seg_start=i64, seg_len=i64, nch="i64", tabs=i64, chunk_raw=i64),
         dict(LANES=cc.CRC_LANES, LANE_BYTES=cc.CRC_LANE_BYTES), "crc chunk"),
        (cc._crc_combine_kernel, dict(chunk_raw=i64, nch="i64", tabs=i64, out=i64),
         dict(TILE=cc.COMBINE_TILE, LANES=cc.CRC_LANES), "crc combine"),
        (ce._index_kernel, dict(idx=i64, lay=i64, blk=i64, err=i32, scratch=i32, out=u8),
         dict(BLOCK=ce.INDEX_BLOCK), "encode index"),
        (ce._bitmap_copy_kernel, dict(scratch=i32, lay=i64, blk=i64, out=u8),
         dict(BLOCK=ce.COPY_BLOCK), "encode bitmap copy"),
        (cd._finalize_kernel, dict(lay=i64, rec=i64, status=i32, cnt=i64, cum=i64, bad=i32, C="i32", L="i32",
                                   NB="i32", all_or_nothing="i32"), dict(LP=64), "decode finalize"),
        (cd._extract_kernel, dict(buf=u8, starts=i64, lens=i64, lay=i64, blk=i64, rec=i64, cnt=i64, cum=i64,
                                  koff=i64, idx_out=i64, L="i32", NB="i32"), dict(BLOCK_=cd.BLOCK), "decode extract"),
    ]
    for ha, ck in ((False, False), (True, False), (True, True)):
        out.append((cd._parse_kernel, dict(buf=u8, starts=i64, lens=i64, crcs=i64, lay=i64, rec=i64, status=i32,
                                           L="i32"), dict(has_aligned=ha, check_ak=ck, TILE=64),
                    f"decode parse aligned={int(ha)} check_k={int(ck)}"))
    for cv in (False, True):
        out.append((cd._check_kernel, dict(buf=u8, starts=i64, lens=i64, lay=i64, blk=i64, rec=i64, status=i32,
                                           cnt=i64, bad=i32, L="i32", NB="i32"),
                    dict(CHECK_VALUES=cv, BLOCK_=cd.BLOCK), f"decode check values={int(cv)}"))
    for hw in (False, True):
        out.append((cd._accumulate_kernel, dict(buf=u8, starts=i64, lens=i64, lay=i64, blk=i64, rec=i64, status=i32,
                                                cnt=i64, cum=i64, weights=f32, positions=i64, out=f32, C="i32",
                                                L="i32", NB="i32", nsteps="i32"),
                    dict(HAS_W=hw, BLOCK_=cd.BLOCK), f"decode accumulate weighted={int(hw)}"))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability (90)")
    args = parser.parse_args(argv)
    variants = _variants()
    if any(not hasattr(fn, "arg_names") or type(fn).__name__ == "InterpretedFunction" for fn, *_ in variants):
        print("codec_compile: the kernels were defined for Triton's interpreter (TRITON_INTERPRET=1), "
              "which compiles nothing: run without it")
        return 2
    from .compile_check import compile_all

    chosen = []
    for fn, sig, consts, label in variants:
        options = {"num_warps": 4}
        if fn.__name__ == "_accumulate_kernel":
            options["enable_fp_fusion"] = False  # as launched: no FMA in out + w * v
        chosen.append((fn, sig, consts, options, label))
    return 1 if compile_all(chosen, args.arch) else 0


if __name__ == "__main__":
    sys.exit(main())
