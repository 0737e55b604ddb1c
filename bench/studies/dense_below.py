"""Upload bytes of the ``dgp`` compressor's ``dense_below`` thresholds on real model shapes.

For each model, one upload of one gradient per threshold: ``len(encode(payload))`` (the
wire bytes the simulator counts) and its ratio to the authors' behaviour
(``dense_below=0``), with the number of tensors and entries sent dense. ``convnet_small``
uses a real gradient (one batch of 32 built-in digits at initialisation); the CIFAR
ResNet-18 uses standard-normal entries per tensor (the byte count depends on the counts and
the codec's position coding, not on the values' distribution).

    python bench/studies/dense_below.py [--thresholds none,0,5,20,100,1000,10000]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from dgp_kernels.codec import encode  # noqa: E402
from dgp_kernels.compressor import get_compressor  # noqa: E402
from dgp_kernels.sim import SimConfig, build_model, load_dataset  # noqa: E402


def model_gradient(model: str) -> List[torch.Tensor]:
    """One gradient per parameter of ``model`` (see the module docstring)."""
    torch.manual_seed(0)
    if model == "convnet_small":
        net = build_model(SimConfig(model=model, dataset="digits"))
        x, y = load_dataset("digits")
        F.cross_entropy(net(x[:32]), y[:32]).backward()
        return [p.grad.detach().clone() for p in net.parameters()]
    net = build_model(SimConfig(model=model, dataset="cifar10"))
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(p.shape, generator=gen) for p in net.parameters()]


def measure(grads: Sequence[torch.Tensor], thresholds: Sequence[Optional[int]]) -> List[Dict[str, Any]]:
    rows = []
    base = len(encode(get_compressor("dgp", dense_below=0).compress(grads)))
    for t in thresholds:
        c = get_compressor("dgp", dense_below=t)
        p = c.compress(grads)
        dense = [layer.numel for layer in p.layers if layer.indices is None]
        n = len(encode(p))
        rows.append({"dense_below": t, "bytes": n, "vs_authors": n / base,
                     "dense_tensors": len(dense), "dense_entries": sum(dense),
                     "dense_share_of_entries": sum(dense) / sum(g.numel() for g in grads)})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--thresholds", default="none,0,5,20,100,1000,10000")
    ap.add_argument("--models", default="convnet_small,resnet18_cifar")
    args = ap.parse_args(argv)
    ts = [None if t == "none" else int(t) for t in args.thresholds.split(",")]
    out = {}
    for m in args.models.split(","):
        grads = model_gradient(m)
        rows = measure(grads, ts)
        out[m] = {"tensors": len(grads), "entries": sum(g.numel() for g in grads), "rows": rows}
        print(f"\n{m}: {len(grads)} tensors, {sum(g.numel() for g in grads):,} entries")
        print("| dense_below | upload bytes | vs dense_below=0 | tensors dense | entries dense |")
        print("|---|---:|---:|---:|---:|")
        for r in rows:
            name = "None (default)" if r["dense_below"] is None else str(r["dense_below"])
            print(f"| {name} | {r['bytes']:,} | {r['vs_authors']:.4f} | {r['dense_tensors']} | "
                  f"{r['dense_entries']:,} |")
    print(json.dumps(out), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
