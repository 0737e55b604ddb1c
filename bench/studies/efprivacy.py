"""What the multi-round attacker of ``dgp_kernels.attacks.multiround`` can read through
each ``top_feedback`` policy, without running an attack: the client's model and batch are
held fixed (the same gradient every round, the case most favourable to the attacker) and
the uploads of ``R`` rounds go through the compressor with error feedback and the codec
(as ``multi_round_uploads`` does; the attack package's defense specs do not take
``top_feedback``, so the compressor is built here).

Per policy and ``R``: the share of coordinates sent at least once; the share of the
gradient's ``k_top`` largest entries per layer (the ones DGP withholds) sent at least once;
the share of the gradient's squared norm on those entries that the accumulated upload
(:func:`~dgp_kernels.attacks.multiround.accumulate`) reproduces, and the cosine of the
accumulated upload with the gradient. Models: the attack evaluation's ``lenet_sigmoid`` on
one built-in digits image, and ``convnet_small`` on a batch of 8.

    python bench/studies/efprivacy.py [--rounds 1,5,20] [--policies full,clipped,floor,drop]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Sequence

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from dgp_kernels import ops  # noqa: E402
from dgp_kernels.attacks.defenses import sent_mask_from_payload  # noqa: E402
from dgp_kernels.attacks.multiround import RoundUpload, accumulate  # noqa: E402
from dgp_kernels.codec import decode, encode  # noqa: E402
from dgp_kernels.compressor import get_compressor  # noqa: E402
from dgp_kernels.sim import SimConfig, build_model, load_dataset  # noqa: E402


def gradient(model: str, batch: int) -> List[torch.Tensor]:
    torch.manual_seed(0)
    net = build_model(SimConfig(model=model, dataset="digits"))
    x, y = load_dataset("digits")
    F.cross_entropy(net(x[:batch]), y[:batch]).backward()
    return [p.grad.detach().clone() for p in net.parameters()]


def reveal(grads: Sequence[torch.Tensor], policy: str, rounds: int, top: float = 0.05,
           keep: float = 0.2) -> Dict[str, Any]:
    # multi_round_uploads() of the attack package, with the policy (its defense specs take
    # top/keep/value_dtype only): the compressor with error feedback, through the codec.
    comp = get_compressor("dgp", top=top, keep=keep, top_feedback=policy)
    ups = []
    for _ in range(rounds):
        wire = encode(comp.compress(grads))
        payload = decode(wire, [g.numel() for g in grads])
        dense = comp.decompress(payload, [g.shape for g in grads])
        ups.append(RoundUpload(shared_grads=dense, sent_mask=sent_mask_from_payload(payload, dense),
                               upload_bytes=len(wire)))
    acc = accumulate(ups)
    n = top_n = top_hit = 0
    sent = 0
    top_e2 = top_err2 = 0.0
    dot = na = ng = 0.0
    for g, a, m in zip(grads, acc.shared_grads, acc.sent_mask):
        gf, af, mf = g.reshape(-1).double(), a.reshape(-1).double(), m.reshape(-1)
        n += gf.numel()
        sent += int(mf.sum())
        dot += float((gf * af).sum())
        na += float((af * af).sum())
        ng += float((gf * gf).sum())
        t = ops.select(g.reshape(-1), 0.0, top)[0]
        if t.numel():
            top_n += t.numel()
            top_hit += int(mf[t].sum())
            top_e2 += float(gf[t].pow(2).sum())
            top_err2 += float((gf[t] - af[t]).pow(2).sum())
    return {"policy": policy, "rounds": rounds, "sent_ever": sent / n,
            "top_sent_ever": top_hit / max(1, top_n),
            "top_energy_recovered": 1.0 - top_err2 / top_e2 if top_e2 else 0.0,
            "cosine": dot / (na ** 0.5 * ng ** 0.5) if na and ng else 0.0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", default="1,5,20")
    ap.add_argument("--policies", default="full,clipped,floor,drop")
    args = ap.parse_args(argv)
    out = []
    for model, batch in (("lenet_sigmoid", 1), ("convnet_small", 8)):
        grads = gradient(model, batch)
        print(f"\n{model}, batch {batch}: multi-round attacker, fixed gradient")
        print("| policy | rounds | coordinates sent at least once % | top-band entries sent at least once % | "
              "top-band energy recovered % | cosine(accumulated, gradient) |")
        print("|---|---:|---:|---:|---:|---:|")
        for pol in args.policies.split(","):
            for r in [int(x) for x in args.rounds.split(",")]:
                row = reveal(grads, pol, r)
                row["model"] = model
                out.append(row)
                print(f"| {pol} | {r} | {100 * row['sent_ever']:.1f} | {100 * row['top_sent_ever']:.1f} | "
                      f"{100 * row['top_energy_recovered']:.1f} | {row['cosine']:.3f} |")
    print(json.dumps(out), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
