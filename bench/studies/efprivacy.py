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

``--attack`` instead runs the multi-round attacker itself
(:func:`~dgp_kernels.attacks.multiround.attack_rounds`) per policy and photo: the attack
evaluation's default case (sigmoid LeNet, 32x32 photos astronaut, chelsea, coffee, rocket,
label known, photo ``i`` alone with its model seeded ``i`` as in ``dgp evaluate``), ``R``
rounds with error feedback through the codec, adaptive Inverting Gradients (``--iterations``
steps, the attack class's default ``schedule="step"``) over TV {0.005, 0.2} x 2 starts (best
by PSNR). One JSON line per (photo, policy) is appended to
``--out`` as it finishes and a line already there is not run again (resumable); the table
(leakage in dB above the mean-colour floor, round 1 alone and the ``R`` rounds accumulated)
is printed from the file. Per photo it also records whether a policy's ``R`` uploads are
bitwise those of ``full``; then the attack on them is the same seeded computation and
``full``'s result is recorded for it (``reused_full_attack``) instead of running it again.

    python bench/studies/efprivacy.py --attack [--photos 4] [--attack-rounds 5]
        [--iterations 1000] [--policies full,clipped,floor,drop] [--out efprivacy_attack.jsonl]
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


#: Adaptive IG's tuning grid of the multi-round attack: TV weight x (init, restart).
ATTACK_SETTINGS = tuple({"tv_weight": tv, "init": init, "restart": r}
                        for tv in (0.005, 0.2) for init, r in (("randn", 0), ("uniform", 1)))


def _same_uploads(a, b) -> bool:
    return len(a) == len(b) and all(
        x.upload_bytes == y.upload_bytes
        and all(torch.equal(g, h) for g, h in zip(x.shared_grads, y.shared_grads))
        and all(torch.equal(m, n) for m, n in zip(x.sent_mask, y.sent_mask)) for x, y in zip(a, b))


def attack_policies(policies: Sequence[str], photos: int, rounds: int, iterations: int, out: str,
                    top: float = 0.05, keep: float = 0.2) -> List[Dict[str, Any]]:
    """Run the multi-round attack per (photo, policy), appending one JSON line each to
    ``out`` (skipping pairs already there); returns every line of ``out``."""
    from dgp_kernels.attacks.base import compute_gradients
    from dgp_kernels.attacks.multiround import attack_rounds, multi_round_uploads
    from dgp_kernels.cases.models import get_model
    from dgp_kernels.cases.targets import load_targets

    done: Dict[Any, Dict[str, Any]] = {}
    if os.path.exists(out):
        with open(out) as f:
            for line in f:
                d = json.loads(line)
                done[(d["photo"], d["policy"])] = d
    t = load_targets("photos", photos)
    for i, name in enumerate(t.names):
        x, y = t.images[i: i + 1], t.labels[i: i + 1]
        torch.manual_seed(i)  # the attack evaluation's model of batch i (seed 0 * 1_000_003 + i)
        model = get_model("lenet_sigmoid", num_classes=10, channels=3, image_size=32)
        grads = compute_gradients(model, x, y)
        ref = multi_round_uploads(grads, f"dgp:top={top},keep={keep}", rounds, model=model)
        for pol in policies:
            if (name, pol) in done:
                continue
            spec = f"dgp:top={top},keep={keep},top_feedback={pol}"
            same = _same_uploads(multi_round_uploads(grads, spec, rounds, model=model), ref)
            if same and pol != "full" and (name, "full") in done:
                # Bitwise the same R uploads and model as "full": the attack (seeded) is the
                # same computation, so its result is full's.
                res = dict(done[(name, "full")], defense=spec, seconds=0.0)
                reused = True
            else:
                res = attack_rounds(model, x, y, spec, rounds, params={"iterations": iterations},
                                    settings=ATTACK_SETTINGS)
                reused = False
            row = dict(res, photo=name, policy=pol, uploads_same_as_full=same, reused_full_attack=reused,
                       loadavg=" ".join(f"{v:.2f}" for v in os.getloadavg()))
            done[(name, pol)] = row
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{name} {pol}: single {row['single']['leakage']:.2f} dB, accumulated "
                  f"{row['accumulated']['leakage']:.2f} dB, {row['seconds']:.0f} s", file=sys.stderr, flush=True)
    with open(out) as f:
        return [json.loads(line) for line in f]


def attack_table(rows: Sequence[Dict[str, Any]]) -> str:
    """Markdown: per policy, leakage (dB above the floor) of round 1 alone and of the
    accumulated rounds per photo, their mean, SSIM and coordinates covered (mean)."""
    photos = list(dict.fromkeys(r["photo"] for r in rows))
    pols = list(dict.fromkeys(r["policy"] for r in rows))
    by = {(r["photo"], r["policy"]): r for r in rows}
    out = ["| policy | case | " + " | ".join(photos) + " | mean dB | mean SSIM | covered % | uploads = full's |",
           "|---|---|" + "---:|" * len(photos) + "---:|---:|---:|---|"]
    for pol in pols:
        have = [by[(ph, pol)] for ph in photos if (ph, pol) in by]
        for case in ("single", "accumulated"):
            vals = [f"{by[(ph, pol)][case]['leakage']:.2f}" if (ph, pol) in by else "" for ph in photos]
            mean = sum(r[case]["leakage"] for r in have) / len(have)
            ssim = sum(r[case]["ssim"] for r in have) / len(have)
            cov = 100 * sum(r[case]["sent_fraction"] for r in have) / len(have)
            same = f"{sum(r['uploads_same_as_full'] for r in have)}/{len(have)}" if case == "accumulated" else ""
            out.append(f"| {pol} | {'round 1' if case == 'single' else str(have[0]['rounds']) + ' rounds'} | "
                       + " | ".join(vals) + f" | {mean:.2f} | {ssim:.3f} | {cov:.1f} | {same} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", default="1,5,20")
    ap.add_argument("--policies", default="full,clipped,floor,drop")
    ap.add_argument("--attack", action="store_true", help="run the multi-round attack (see the docstring)")
    ap.add_argument("--photos", type=int, default=4)
    ap.add_argument("--attack-rounds", type=int, default=5)
    ap.add_argument("--iterations", type=int, default=1000)
    ap.add_argument("--out", default="efprivacy_attack.jsonl")
    args = ap.parse_args(argv)
    if args.attack:
        rows = attack_policies(args.policies.split(","), args.photos, args.attack_rounds,
                               args.iterations, args.out)
        print(attack_table(rows))
        return 0
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
