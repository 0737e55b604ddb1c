"""A multi-round attacker for error feedback: the server sees one client's uploads over
``R`` rounds and attacks what they add up to.

With error feedback a sparsifying compressor keeps what it does not send in a residual and
adds it to the next round's gradient, so coordinates withheld in one round can be sent in a
later one. A single round's upload may hide a coordinate that ``R`` rounds reveal. This
module measures that:

* :func:`multi_round_uploads` runs the registered compressor **with its error feedback** (as
  the simulator trains) ``R`` times on one client's gradient and passes every round through
  the real wire codec, returning the dense decoded uploads and their sent masks. The
  client's model and batch are held fixed over the rounds (the server's learning rate is
  0): the gradient is the same every round, the case most favourable to the attacker, and
  every difference between rounds comes from the error feedback.
* :func:`accumulate` adds the uploads: ``sum_r upload_r / R`` on the union of the sent
  coordinates (zeros elsewhere). Without error feedback every round sends the same values
  and the mean is the single upload; with it the mean tends to the gradient on every
  coordinate that is ever sent.
* :func:`attack_rounds` attacks round 1 alone and the accumulation of ``R`` rounds with the
  same attack and tuning grid, and returns both scores.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from . import metrics
from .base import ThreatModel, compute_gradients, get_attack
from .defenses import check_gradients, defense_compressor, parse_defense, sent_mask_from_payload

__all__ = ["RoundUpload", "multi_round_uploads", "accumulate", "attack_rounds"]


@dataclass
class RoundUpload:
    """One round's upload as the server decodes it: dense float32 values (zeros where
    nothing was sent), the sent masks and the encoded size."""

    shared_grads: List[Tensor]
    sent_mask: List[Tensor]
    upload_bytes: int

    @property
    def sent_fraction(self) -> float:
        total = sum(m.numel() for m in self.sent_mask)
        return sum(int(m.sum()) for m in self.sent_mask) / total if total else 0.0


def multi_round_uploads(grads: Sequence[Tensor], spec: object, rounds: int, *,
                        error_feedback: bool = True, seed: int = 0,
                        model: Optional[nn.Module] = None) -> List[RoundUpload]:
    """``rounds`` uploads of the same gradient ``grads`` under defense ``spec`` (a spec
    string or :class:`~dgp_kernels.attacks.defenses.DefenseSpec`), through the registered
    compressor with ``error_feedback`` (its memory carries over between the rounds) and the
    wire codec. ``grads`` is not modified."""
    from ..codec import decode, encode
    spec = parse_defense(spec)
    grads = check_gradients(grads, model)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")
    if not isinstance(error_feedback, bool):
        raise TypeError(f"error_feedback must be a bool, got {type(error_feedback).__name__}")
    comp = defense_compressor(spec, error_feedback=error_feedback, seed=seed)
    detached = [g.detach() for g in grads]
    out: List[RoundUpload] = []
    for _ in range(rounds):
        wire = encode(comp.compress(detached))
        payload = decode(wire, [g.numel() for g in detached])
        dense = [d.to(g.device) for d, g in zip(comp.decompress(payload, [g.shape for g in detached]), detached)]
        out.append(RoundUpload(shared_grads=dense, sent_mask=sent_mask_from_payload(payload, dense),
                               upload_bytes=len(wire)))
    return out


def accumulate(uploads: Sequence[RoundUpload]) -> RoundUpload:
    """The mean of the uploads (``sum / R``) and the union of their sent masks; its
    ``upload_bytes`` is the total over the rounds."""
    if not uploads:
        raise ValueError("uploads must hold at least one round")
    r = len(uploads)
    values = [sum(u.shared_grads[i] for u in uploads) / r for i in range(len(uploads[0].shared_grads))]
    masks = [torch.stack([u.sent_mask[i] for u in uploads]).any(0) for i in range(len(uploads[0].sent_mask))]
    return RoundUpload(shared_grads=values, sent_mask=masks, upload_bytes=sum(u.upload_bytes for u in uploads))


def attack_rounds(model: nn.Module, images: Tensor, labels: Tensor, spec: object, rounds: int, *,
                  attack: str = "ig-adaptive", params: Optional[Dict[str, Any]] = None,
                  settings: Sequence[Dict[str, Any]] = ({},), error_feedback: bool = True,
                  seed: int = 0) -> Dict[str, Any]:
    """Attack round 1 alone and the accumulation of ``rounds`` rounds (same attack, same
    tuning ``settings``; the best setting by PSNR per case). Returns a dict with, per case
    (``"single"``, ``"accumulated"``): ``psnr``, ``leakage`` (dB above the flat mean-colour
    floor, mean over the batch), ``ssim``, ``sent_fraction``, ``upload_bytes``, ``setting``;
    plus ``rounds``, ``defense``, ``attack``, ``error_feedback``, ``seconds``."""
    start = time.perf_counter()
    spec = parse_defense(spec)
    grads = compute_gradients(model, images, labels)
    uploads = multi_round_uploads(grads, spec, rounds, error_feedback=error_feedback, seed=seed, model=model)
    atk = get_attack(attack, **(params or {}))
    floor = float(metrics.floor_psnr(images).mean())
    out: Dict[str, Any] = {"rounds": rounds, "defense": spec.label, "attack": attack,
                           "error_feedback": error_feedback}
    for case, up in (("single", uploads[0]), ("accumulated", accumulate(uploads))):
        threat = ThreatModel(model=model, image_shape=tuple(images.shape[1:]), num_classes=int(
            list(model.parameters())[-1].shape[0]), batch_size=images.shape[0], labels=labels,
            sent_mask=up.sent_mask, band=spec.band)
        recs = atk.run_grid(up.shared_grads, threat, list(settings), seed=seed)
        scored = []
        for rec in recs:
            perm = metrics.match_order(rec.images, images) if images.shape[0] > 1 else slice(None)
            imgs = rec.images[perm]
            scored.append((float(metrics.psnr(imgs, images).mean()), float(metrics.ssim(imgs, images).mean()), rec))
        p, s, rec = max(scored, key=lambda t: t[0])
        out[case] = {"psnr": p, "leakage": p - floor, "ssim": s, "sent_fraction": up.sent_fraction,
                     "upload_bytes": up.upload_bytes, "setting": dict(rec.setting)}
    out["seconds"] = time.perf_counter() - start
    return out
