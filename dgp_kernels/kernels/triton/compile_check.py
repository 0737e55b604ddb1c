"""Compile every Triton kernel variant the launcher uses for a GPU target, without a GPU.

    python -m dgp_kernels.kernels.triton.compile_check            # sm_90 (H100, H200)
    python -m dgp_kernels.kernels.triton.compile_check --arch 80  # A100
    python -m dgp_kernels.kernels.triton.compile_check --resources --match write
    python -m dgp_kernels.kernels.triton.compile_check --set block=1024 --resources

The interpreter (``TRITON_INTERPRET=1``) checks what the kernels compute, not that they
lower to PTX. This runs the launcher itself in a dry run (``CallInfo(dry_run=True)``: every
launch is recorded with its arguments instead of run) for each dtype, error feedback or
not, sparse or dense outputs, aligned or not, and each path, then runs Triton's real
compiler (and the ptxas bundled with the triton wheel) on each distinct variant, so a
GPU-only compile error shows up in CI, and the variants compiled are exactly the ones the
launcher asks for. Must run with ``TRITON_INTERPRET`` unset (the test starts it in a
subprocess). Prints one line per variant; exit status 1 if any fails. ``--resources`` adds
what ptxas gave each variant (registers, stack = spills, local memory) and its static SASS
instruction count, read from the cubin with the ``cuobjdump`` in the triton wheel;
``--match`` keeps the variants whose label holds the text; ``--set name=value``
(repeatable) changes a field of the tuning first. A static view, not a timing.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
import time

_PTR = {"torch.int64": "*i64", "torch.int32": "*i32", "torch.float32": "*fp32",
        "torch.float64": "*fp64", "torch.float16": "*fp16", "torch.bfloat16": "*bf16"}


def _signature(kernel, args, torch) -> dict:
    sig = {}
    for name, a in zip(kernel.arg_names, args):
        if isinstance(a, torch.Tensor):
            sig[name] = _PTR[str(a.dtype)]
        elif isinstance(a, bool):
            sig[name] = "i1"
        elif isinstance(a, int):
            sig[name] = "i32" if -2**31 <= a < 2**31 else "i64"
        else:
            sig[name] = "fp32"
    return sig


def variants(tuning, torch):
    """``(kernel, signature, constexprs, num_warps, label)`` of every distinct launch of
    the launcher's dry runs."""
    from .launch import CallInfo
    from .ops import prune_triton, select_ef_multi_triton, select_multi_triton

    out, seen = [], set()
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for path in ("sampled", "candidates", "data"):
            for aligned in (True, False):
                tu = tuning.replace(path=path)
                gs = [torch.zeros(5000 + 1, dtype=dtype)[int(not aligned):], torch.zeros(70, dtype=dtype)]
                es = [torch.zeros_like(g) for g in gs]
                for call in ("ef", "sparse", "dense"):
                    info = CallInfo(dry_run=True)
                    if call == "ef":
                        select_ef_multi_triton(gs, es, tuning=tu, info=info)
                    elif call == "sparse":
                        select_multi_triton(gs, tuning=tu, info=info)
                    else:
                        prune_triton(gs[0], tuning=tu, info=info)
                    for kernel, _grid, args, consts in info.records:
                        consts = dict(consts)
                        warps = consts.pop("num_warps", 4)
                        key = (kernel.fn.__name__, tuple(sorted((k, str(v)) for k, v in consts.items())))
                        if key in seen:
                            continue
                        seen.add(key)
                        flags = ",".join(f"{k}={v}" for k, v in consts.items()
                                         if k in ("HAS_E", "ALIGNED", "SAMPLED", "FROM_CAND",
                                                  "W", "FINAL", "WRITE_SPARSE", "WRITE_DENSE"))
                        label = f"{kernel.fn.__name__} {str(dtype)[6:]} {flags}"
                        out.append((kernel, _signature(kernel, args, torch), consts, warps, label))
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
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="change a field of the default Tuning first, e.g. block=1024")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_check: unset TRITON_INTERPRET (the interpreter compiles nothing)")
        return 2
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .tuning import DEFAULT

    changes = {}
    fields = {f.name: f.type for f in dataclasses.fields(DEFAULT)}
    for item in args.set:
        name, _, value = item.partition("=")
        if name not in fields or not value:
            print(f"compile_check: --set {item!r}: not a Tuning field NAME=VALUE "
                  f"({', '.join(fields)})")
            return 2
        changes[name] = type(getattr(DEFAULT, name))(value)
    tuning = DEFAULT.replace(**changes)
    target = GPUTarget("cuda", args.arch, 32)
    failures = 0
    for fn, sig, consts, warps, label in variants(tuning, torch):
        if args.match not in label:
            continue
        t0 = time.perf_counter()
        src = ASTSource(
            fn=fn,
            signature={**sig, **{k: "constexpr" for k in consts}},
            constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
        )
        try:
            k = triton.compile(src, target=target, options={"num_warps": warps})
            extra = f" {_resources(k.asm['cubin'], triton)}" if args.resources else ""
            print(f"ok   sm_{args.arch} {label:<60} shared={k.metadata.shared:>6} B "
                  f"{time.perf_counter() - t0:.1f}s{extra}")
        except Exception as exc:  # report every failing variant, not just the first
            failures += 1
            print(f"FAIL sm_{args.arch} {label}: {type(exc).__name__}: {exc}")
    print(f"{failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
