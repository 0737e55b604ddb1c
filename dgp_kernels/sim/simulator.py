"""The simulator loop: seeded clients and a server exchanging real encoded payloads.

One round (both algorithms):

1. The server samples the round's participants (``participation`` of the ``clients``; a
   seeded draw, sorted ascending, so the aggregation order is fixed).
2. ADGP only: the broadcaster's positions for this round go to every client (charged as
   download: the wire format's header, layer table and index streams).
3. Each participant computes its update on the current global model — FedSGD: the
   gradient of the mean cross-entropy on one local batch of ``batch_size``; FedAvg: the
   model delta after ``local_epochs`` of local SGD — compresses it with its own
   compressor (own error-feedback residual, own seeded generator), and encodes it with
   :func:`dgp_kernels.codec.encode`. The payload's ``len`` is its upload.
4. The server decodes and accumulates every payload with
   :func:`dgp_kernels.codec.decode_accumulate` (ADGP: at the round's positions, then
   :func:`~dgp_kernels.compressor.aggregate_aligned` of the accepted payloads). A client
   that raised, never answered, or whose payload the decoder rejects is dropped from the
   round with the reason; a rejected payload contributes nothing (the accumulator
   validates a payload fully before adding it). The mean over the accepted clients
   (unweighted in FedSGD, weighted by local sample counts in FedAvg) is the update.
5. FedSGD: the update is the server optimiser's gradient (SGD with momentum and weight
   decay). FedAvg: the update is added to the model.
6. The update is broadcast to every client (all ``clients``, so replicas stay in sync;
   clients replay the server optimiser): its encoded size, per layer the smaller of a
   dense layer and the non-zero entries with their positions, times ``clients`` is the
   round's download. ADGP broadcasts the aligned aggregate (values only) instead.

BatchNorm running statistics (ResNet-18) are not gradients: each client's forward pass
updates a private copy and the server averages the accepted clients' copies; they are
not charged (~0.1% of ResNet-18's parameters).

Determinism: model init, split, sampling, batches and compressors are all seeded from
``SimConfig.seed``; with the same thread count on the same machine two runs give bitwise
identical results (tests/sim/test_simulator.py checks it).
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..codec import LayerPayload, SparsePayload, decode, decode_accumulate, encode
from ..compressor import (
    ADGPCompressor,
    AlignedPositions,
    Broadcaster,
    Compressor,
    aggregate_aligned,
    decompress_aligned,
    get_compressor,
)
from .. import ops
from ..ops import band_counts
from ..optional import progress_bar
from .config import Fault, SimConfig, broadcaster_params, compressor_params
from ..cases.datasets import dataset_info, dirichlet_split, iid_split, load_dataset
from ..cases.models import get_model
from .results import SimResult

__all__ = ["build_model", "simulate", "simulate_defense", "broadcast_nbytes", "positions_nbytes"]

log = logging.getLogger("dgp_kernels.sim")

#: Evaluation batch size (memory only; results do not depend on it beyond float rounding).
EVAL_BATCH = 500


def build_model(config: SimConfig) -> nn.Module:
    """The config's model for its dataset (``num_classes``, ``channels`` and, when the
    model takes it, ``image_size``), initialised from ``config.seed`` without touching the
    caller's global RNG."""
    info = dataset_info(config.dataset)
    from ..cases.models import MODELS

    fn = MODELS[config.model]
    accepted = inspect.signature(fn).parameters
    kw = {k: info[k] for k in ("num_classes", "channels", "image_size") if k in accepted}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return get_model(config.model, **kw)


# --------------------------------------------------------------------------------------
# Byte accounting of what the server sends
# --------------------------------------------------------------------------------------
def broadcast_nbytes(update: Sequence[Tensor]) -> int:
    """Encoded size of a dense update broadcast: per layer the non-zero entries with their
    positions (the codec picks the index coding) or, when that is not smaller, the dense
    layer (float32 values, implicit positions)."""
    layers = []
    for u in update:
        flat = u.detach().reshape(-1).to(device="cpu", dtype=torch.float32)
        n = flat.numel()
        nz = torch.nonzero(flat).reshape(-1)
        # Sparse costs >= 4 bytes per value + >= n/8 bitmap bytes (when denser than ~12%),
        # dense costs 4n: sparse wins below ~31/32 density (the encoder then picks the
        # smallest index coding).
        if nz.numel() * 32 >= n * 31:
            layers.append(LayerPayload(numel=n, indices=None, values=flat))
        else:
            layers.append(LayerPayload(numel=n, indices=nz, values=flat[nz]))
    return len(encode(SparsePayload(layers=tuple(layers))))


def positions_nbytes(positions: AlignedPositions) -> int:
    """Bytes to broadcast ADGP positions: a wire-format payload's header, layer table,
    index streams and checksum (the payload with 2-byte placeholder values, minus them)."""
    layers = tuple(
        LayerPayload(numel=n, indices=idx, values=torch.zeros(idx.numel(), dtype=torch.bfloat16))
        for idx, n in zip(positions.indices, positions.numels)
    )
    return len(encode(SparsePayload(layers=layers))) - 2 * sum(positions.counts)


# --------------------------------------------------------------------------------------
# Clients
# --------------------------------------------------------------------------------------
@dataclass
class _Client:
    cid: int
    indices: Tensor  # int64 positions in the training set
    gen: torch.Generator
    compressor: Compressor
    perm: Optional[Tensor] = None
    ptr: int = 0
    ever_sent: Optional[List[Tensor]] = None  # diagnostics: bool per parameter
    top_held: Optional[List[Tensor]] = None  # diagnostics: bool per parameter, held at the top last round

    @property
    def num_samples(self) -> int:
        return int(self.indices.numel())

    def next_batch(self, batch_size: int) -> Tensor:
        """The next ``batch_size`` local samples of a seeded epoch-wise shuffle (a new
        permutation when fewer than ``batch_size`` remain; all samples when the client
        has no more than ``batch_size``)."""
        n = self.num_samples
        if n <= batch_size:
            return self.indices[torch.randperm(n, generator=self.gen)]
        if self.perm is None or self.ptr + batch_size > n:
            self.perm = torch.randperm(n, generator=self.gen)
            self.ptr = 0
        b = self.perm[self.ptr: self.ptr + batch_size]
        self.ptr += batch_size
        return self.indices[b]

    def epoch_batches(self, batch_size: int) -> Iterable[Tensor]:
        perm = torch.randperm(self.num_samples, generator=self.gen)
        for s in range(0, self.num_samples, batch_size):
            yield self.indices[perm[s: s + batch_size]]


class _InjectedFault(RuntimeError):
    pass


def _seeded_gen(*parts: int) -> torch.Generator:
    s = 0
    for p in parts:
        s = (s * 1_000_003 + int(p) + 1) % (2**61 - 1)
    return torch.Generator().manual_seed(s)


def _buffers(model: nn.Module) -> List[Tuple[str, Tensor]]:
    return [(n, b) for n, b in model.named_buffers()]


def _snapshot(model: nn.Module) -> List[Tensor]:
    return [b.detach().clone() for _, b in _buffers(model)]


def _restore(model: nn.Module, snap: Sequence[Tensor]) -> None:
    with torch.no_grad():
        for (_, b), s in zip(_buffers(model), snap):
            b.copy_(s)


def _mean_buffers(snaps: Sequence[Sequence[Tensor]], weights: Sequence[float]) -> List[Tensor]:
    total = math.fsum(weights)
    out = []
    for j in range(len(snaps[0])):
        ref = snaps[0][j]
        if ref.dtype.is_floating_point:
            acc = torch.zeros_like(ref, dtype=torch.float64)
            for s, w in zip(snaps, weights):
                acc.add_(s[j].to(torch.float64), alpha=w)
            out.append((acc / total).to(ref.dtype))
        else:  # counters (num_batches_tracked)
            out.append(torch.stack([s[j] for s in snaps]).max())
    return out


# --------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------
@torch.no_grad()
def _evaluate(model: nn.Module, x: Tensor, y: Tensor, device: torch.device) -> Tuple[float, float]:
    was = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    for s in range(0, x.shape[0], EVAL_BATCH):
        xb, yb = x[s: s + EVAL_BATCH].to(device), y[s: s + EVAL_BATCH].to(device)
        out = model(xb)
        loss_sum += float(F.cross_entropy(out, yb, reduction="sum"))
        correct += int((out.argmax(1) == yb).sum())
    model.train(was)
    n = max(1, x.shape[0])
    return correct / n, loss_sum / n


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------
def _faults_by_key(faults: Optional[Iterable[Fault]]) -> Dict[Tuple[int, int], str]:
    out: Dict[Tuple[int, int], str] = {}
    for f in faults or ():
        if not isinstance(f, Fault):
            raise TypeError(f"faults must hold Fault records, got {type(f).__name__}")
        out[(f.round, f.client)] = f.kind
    return out


def _tamper(data: bytes, kind: str) -> bytes:
    if kind == "corrupt":
        b = bytearray(data)
        b[len(b) // 2] ^= 0x5A
        return bytes(b)
    if kind == "truncate":
        return data[: max(0, len(data) - 7)]
    return data


def _with_nan(payload: SparsePayload) -> SparsePayload:
    layers = list(payload.layers)
    for i, layer in enumerate(layers):
        if layer.k:
            v = layer.values.detach().to(torch.float32).clone()
            v[0] = float("nan")
            layers[i] = LayerPayload(numel=layer.numel, indices=layer.indices, values=v)
            break
    return SparsePayload(layers=tuple(layers), aligned=payload.aligned, meta=payload.meta)


def simulate(config: SimConfig, *, progress: bool = True,
             faults: Optional[Iterable[Fault]] = None, desc: Optional[str] = None) -> SimResult:
    """Run one simulated collaborative-learning job and return per-round accuracy and bytes.

    Args:
        config: the run (:class:`SimConfig`; validated first, errors name the field).
        progress: show a tqdm bar (accuracy and cumulative upload in the postfix).
        faults: client failures to inject (:class:`Fault` records), for tests and
            robustness studies; real exceptions raised by a client are handled the same way.
        desc: the progress bar's label (default: the defense name).

    Returns:
        :class:`SimResult` with one dict per round (see its docstring) and the final model
        state. With ``config.diagnostics`` each round also records, averaged over the
        clients that compressed: ``grad_norm`` (L2 of the update before compression),
        ``residual_norm`` (L2 of the error-feedback residual after compression),
        ``residual_never_sent_norm`` (its part on coordinates this client has never
        sent), ``residual_never_sent_share`` (the fraction of the residual's squared L2
        norm on those coordinates), ``grad_never_sent_share`` (the same for this round's
        update: how much of the gradient lies where the client has never sent),
        ``never_sent_fraction``, ``residual_max_abs`` and, for DGP,
        ``top_never_sent_fraction`` (of the entries held back at the top this round, the
        fraction this client has never sent) and ``top_repeat_fraction`` (the fraction
        that were also held back at the top in this client's previous round: near 1 means
        the top band is occupied by the same parked coordinates round after round),
        ``top_dropped_l1`` (L1 of what the ``top_feedback`` policy dropped this round, 0
        for the authors' ``"full"``); and,
        across clients, ``server_never_received_fraction`` (coordinates no client has
        ever sent) and ``top_held_by_all_fraction`` (coordinates every participant held
        back at the top this round).
    """
    if not isinstance(config, SimConfig):
        raise TypeError(f"config must be a SimConfig, got {type(config).__name__}")
    config.validate()
    fault_at = _faults_by_key(faults)
    threads_before = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        return _simulate(config, progress, fault_at, desc)
    finally:
        torch.set_num_threads(threads_before)


def simulate_defense(defense: str, defense_params: Optional[Dict[str, Any]] = None, *,
                     progress: bool = True, **config: Any) -> SimResult:
    """One training run under ``defense`` (a compressor name with its parameters): the
    trainer the attack evaluation takes for its utility columns
    (:func:`dgp_kernels.attacks.runner.run_evaluation`). ``config`` holds any other
    :class:`SimConfig` fields (``rounds``, ``clients``, ``dataset``, ``model``, ``seed``,
    ``device``, ...)."""
    cfg = SimConfig(defense=defense, defense_params=dict(defense_params or {}), **config)
    return simulate(cfg, progress=progress)


def _simulate(config: SimConfig, progress: bool, fault_at: Dict[Tuple[int, int], str],
              desc: Optional[str] = None) -> SimResult:
    device = torch.device(config.device)

    x_train, y_train = load_dataset(config.dataset, config.data_root, "train")
    x_test, y_test = load_dataset(config.dataset, config.data_root, "test")
    if config.test_limit:
        x_test, y_test = x_test[: config.test_limit], y_test[: config.test_limit]
    if config.split == "iid":
        shards = iid_split(x_train.shape[0], config.clients, config.seed)
    else:
        shards = dirichlet_split(y_train, config.clients, config.alpha, config.seed)
    if device.type != "cpu":
        x_train, y_train = x_train.to(device), y_train.to(device)

    model = build_model(config).to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    numels = [p.numel() for p in params]
    dense_bytes = 4 * sum(numels)

    clients = [
        _Client(cid=c, indices=shards[c], gen=_seeded_gen(config.seed, 11, c),
                compressor=get_compressor(config.defense, **compressor_params(config, c)))
        for c in range(config.clients)
    ]
    sampler = _seeded_gen(config.seed, 13)
    m = max(1, int(round(config.participation * config.clients)))

    fedsgd = config.algorithm == "fedsgd"
    server_opt = None
    if fedsgd:
        server_opt = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                                     weight_decay=config.weight_decay)
    local_model = None if fedsgd else copy.deepcopy(model)

    adgp = config.defense == "adgp"
    broadcaster = Broadcaster(**broadcaster_params(config)) if adgp else None
    position_rule = config.defense_params.get("positions", "fresh") if adgp else None
    # The broadcaster's own gradient: trusted client 0's data, from a separate batch stream
    # (so client 0's training batches are the same as in any other defense's run). Under
    # the "fresh" rule it keeps its own ADGP residual e and ranks g + e, as rank 0 does in
    # the DDP hook; under "gradient" it ranks g alone.
    bcast_client = _Client(
        cid=-1, indices=shards[0], gen=_seeded_gen(config.seed, 17),
        compressor=get_compressor("adgp", **compressor_params(config, 0))
        if position_rule == "fresh" else get_compressor("none")) if adgp else None
    positions: Optional[AlignedPositions] = None

    def local_gradient(cl: _Client, batch: Tensor) -> List[Tensor]:
        model.zero_grad(set_to_none=True)
        xb, yb = x_train[batch].to(device), y_train[batch].to(device)
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        return [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]

    def local_delta(cl: _Client, lr: float) -> List[Tensor]:
        assert local_model is not None
        local_model.load_state_dict(model.state_dict())
        local_model.train()
        lparams = [p for p in local_model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(lparams, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)
        for _ in range(config.local_epochs):
            for batch in cl.epoch_batches(config.batch_size):
                opt.zero_grad(set_to_none=True)
                xb, yb = x_train[batch].to(device), y_train[batch].to(device)
                F.cross_entropy(local_model(xb), yb).backward()
                opt.step()
        with torch.no_grad():
            return [lp.detach() - gp.detach() for lp, gp in zip(lparams, params)]

    result = SimResult(config=config, dense_bytes=dense_bytes, num_params=sum(numels))
    bar = progress_bar(config.rounds, desc or config.defense, unit="round", enabled=progress)
    cum_upload = 0
    t0 = time.perf_counter()
    eval_s = 0.0
    try:
        for r in range(config.rounds):
            lr = config.lr_at(r)
            if server_opt is not None:
                for group in server_opt.param_groups:
                    group["lr"] = lr
            if m == config.clients:
                participants = list(range(config.clients))
            else:
                participants = sorted(torch.randperm(config.clients, generator=sampler)[:m].tolist())
            dropped: List[Dict[str, Any]] = []
            download_per_client = 0
            t_round = time.perf_counter()
            local_s = 0.0  # seconds of local training (forward/backward, local steps)

            def drop(cid: int, stage: str, reason: str) -> None:
                dropped.append({"client": cid, "stage": stage, "reason": reason})
                log.warning("round %d: client %d dropped (%s): %s", r, cid, stage, reason)

            # ---- ADGP: this round's positions ---------------------------------------
            if adgp:
                assert broadcaster is not None and bcast_client is not None
                if positions is None or position_rule != "aggregate":
                    snap = _snapshot(model)
                    t_local = time.perf_counter()
                    own = [g.detach().clone() for g in
                           local_gradient(bcast_client, bcast_client.next_batch(config.batch_size))]
                    local_s += time.perf_counter() - t_local
                    bc = bcast_client.compressor
                    if isinstance(bc, ADGPCompressor):  # "fresh": the band of its own g + e
                        res = bc.memory.peek()
                        ranked = own if res is None else [g + e for g, e in zip(own, res)]
                        positions = broadcaster.choose(ranked)
                        bc.set_positions(positions)
                        bc.compress(own)  # its residual: what it did not send at them
                    else:
                        positions = broadcaster.choose(own)
                    _restore(model, snap)
                download_per_client += positions_nbytes(positions)
                for cl in clients:
                    assert isinstance(cl.compressor, ADGPCompressor)
                    cl.compressor.set_positions(positions)

            # ---- clients ----------------------------------------------------------------
            payloads: List[bytes] = []
            senders: List[int] = []
            uploads: List[int] = []
            client_buffers: Dict[int, List[Tensor]] = {}
            diag: List[Dict[str, float]] = []
            diagnosed: List[int] = []  # clients that compressed this round (diagnostics)
            base_buffers = _snapshot(model)
            for c in participants:
                cl = clients[c]
                kind = fault_at.get((r, c))
                if kind == "absent":
                    drop(c, "absent", "client did not answer (injected fault)")
                    continue
                stage = "train"
                t_local = time.perf_counter()
                try:
                    if fedsgd:
                        update = local_gradient(cl, cl.next_batch(config.batch_size))
                        client_buffers[c] = _snapshot(model)
                        _restore(model, base_buffers)
                    else:
                        update = local_delta(cl, lr)
                        assert local_model is not None
                        client_buffers[c] = _snapshot(local_model)
                    local_s += time.perf_counter() - t_local
                    if kind == "raise":
                        raise _InjectedFault("local training raised (injected fault)")
                    stage = "compress"
                    payload = cl.compressor.compress(update)
                    if config.diagnostics:
                        diag.append(_diagnose(cl, update, payload, positions))
                        diagnosed.append(c)
                    if kind == "nan_payload":
                        payload = _with_nan(payload)
                    stage = "encode"
                    data = encode(payload)
                except Exception as exc:  # a failing client must not stop the round
                    _restore(model, base_buffers)
                    client_buffers.pop(c, None)
                    drop(c, stage, f"{type(exc).__name__}: {exc}")
                    continue
                if kind in ("corrupt", "truncate"):
                    data = _tamper(data, kind)
                payloads.append(data)
                senders.append(c)
                uploads.append(len(data))

            # ---- server -----------------------------------------------------------------
            weights = None if fedsgd else [float(clients[c].num_samples) for c in senders]
            outs = [torch.zeros(n, dtype=torch.float32) for n in numels]
            report = decode_accumulate(
                payloads, outs, weights,
                indices=list(positions.indices) if adgp and positions is not None else None,
            )
            for rej in report.rejected:
                drop(senders[rej.client], "decode", rej.reason)
            accepted = [senders[i] for i in report.accepted]
            if accepted:
                if adgp:
                    assert positions is not None
                    decoded = [decode(payloads[i], numels) for i in report.accepted]
                    agg = aggregate_aligned(decoded, positions,
                                            None if weights is None else [weights[i] for i in report.accepted])
                    update = decompress_aligned(agg, positions, [p.shape for p in params])
                    download_per_client += len(encode(agg))
                else:
                    update = [o.div_(report.weight_sum).view(p.shape) for o, p in zip(outs, params)]
                    download_per_client += broadcast_nbytes(update)
                _apply(model, params, update, server_opt, device)
                bw = [1.0 if weights is None else float(clients[c].num_samples) for c in accepted]
                _restore(model, _mean_buffers([client_buffers[c] for c in accepted], bw))
                if adgp and position_rule == "aggregate":
                    assert broadcaster is not None
                    positions = broadcaster.observe(agg)
            else:
                log.warning("round %d: no client update accepted; the model is unchanged", r)

            # ---- bookkeeping --------------------------------------------------------------
            upload = sum(uploads)
            cum_upload += upload
            row: Dict[str, Any] = {
                "round": r,
                "test_accuracy": None,
                "test_loss": None,
                "upload_bytes": upload,
                "download_bytes": download_per_client * config.clients,
                "wall_s": 0.0,
                "train_s": 0.0,
                "round_s": 0.0,
                "local_s": local_s,
                "lr": lr,
                "participants": participants,
                "dropped": dropped,
            }
            if diag:
                for key in diag[0]:
                    row[key] = sum(d[key] for d in diag) / len(diag)
                row.update(_server_diagnostics(clients, diagnosed))
            t_train = time.perf_counter()
            row["round_s"] = t_train - t_round
            if (r + 1) % config.eval_every == 0 or r == config.rounds - 1:
                acc, loss = _evaluate(model, x_test, y_test, device)
                row["test_accuracy"], row["test_loss"] = acc, loss
            now = time.perf_counter()
            eval_s += now - t_train
            row["wall_s"] = now - t0
            row["train_s"] = now - t0 - eval_s
            result.rounds.append(row)
            if bar is not None:
                acc_txt = "-" if row["test_accuracy"] is None else f"{100 * row['test_accuracy']:.1f}%"
                bar.set_postfix_str(f"acc {acc_txt} up {cum_upload / 1e6:.2f} MB", refresh=False)
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    result.model_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return result


def _apply(model: nn.Module, params: Sequence[Tensor], update: Sequence[Tensor],
           server_opt: Optional[torch.optim.Optimizer], device: torch.device) -> None:
    if server_opt is not None:  # FedSGD: the mean gradient drives the server optimiser
        for p, u in zip(params, update):
            p.grad = u.to(device=device, dtype=p.dtype).view(p.shape)
        server_opt.step()
        server_opt.zero_grad(set_to_none=True)
    else:  # FedAvg: add the mean delta
        with torch.no_grad():
            for p, u in zip(params, update):
                p.add_(u.to(device=device, dtype=p.dtype).view(p.shape))


def _server_diagnostics(clients: Sequence[_Client], compressed: Sequence[int]) -> Dict[str, float]:
    """Across clients (diagnostics): ``server_never_received_fraction``, the fraction of
    coordinates no client has ever sent (the server has never had data for them), and
    ``top_held_by_all_fraction``, the fraction held back at the top by every client that
    compressed this round (``compressed``; DGP, 0 otherwise)."""
    sent = [cl.ever_sent for cl in clients if cl.ever_sent is not None]
    if not sent:
        return {}
    total = sum(t.numel() for t in sent[0])
    union = [torch.zeros_like(t) for t in sent[0]]
    for per_client in sent:
        for u, t in zip(union, per_client):
            u |= t
    out = {"server_never_received_fraction": sum(int((~u).sum()) for u in union) / max(1, total)}
    held = [clients[c].top_held for c in compressed]
    if held and all(h is not None for h in held):
        inter = [h.clone() for h in held[0]]
        for per_client in held[1:]:
            for i, t in zip(inter, per_client):
                i &= t
        out["top_held_by_all_fraction"] = sum(int(i.sum()) for i in inter) / max(1, total)
    else:
        out["top_held_by_all_fraction"] = 0.0
    return out


def _diagnose(cl: _Client, update: Sequence[Tensor], payload: SparsePayload,
              positions: Optional[AlignedPositions]) -> Dict[str, float]:
    """Error-feedback diagnostics of one client after one compress (see simulate())."""
    if cl.ever_sent is None:
        cl.ever_sent = [torch.zeros(u.numel(), dtype=torch.bool, device="cpu") for u in update]
    for i, layer in enumerate(payload.layers):
        if payload.aligned and positions is not None:
            cl.ever_sent[i][positions.indices[i]] = True
        elif layer.indices is None:
            cl.ever_sent[i][:] = True
        else:
            cl.ever_sent[i][layer.indices.cpu()] = True
    g2 = g2_never = 0.0
    for u, sent in zip(update, cl.ever_sent):
        uf = u.detach().reshape(-1).double().cpu()
        g2 += float(uf.pow(2).sum())
        g2_never += float(uf[~sent].pow(2).sum())
    res = cl.compressor.memory.peek()
    e2 = never2 = 0.0
    emax = 0.0
    if res is not None:
        for e, sent in zip(res, cl.ever_sent):
            ef = e.detach().reshape(-1).double().cpu()
            e2 += float(ef.pow(2).sum())
            never2 += float(ef[~sent].pow(2).sum())
            if ef.numel():
                emax = max(emax, float(ef.abs().max()))
    total = sum(s.numel() for s in cl.ever_sent)
    never = sum(int((~s).sum()) for s in cl.ever_sent)
    # DGP: after compress the residual holds v = g + e everywhere except the sent band, so
    # its k_top largest magnitudes per layer are exactly the entries held back at the top.
    # A top_feedback policy other than "full" changes the residual there, but the compressor
    # reports the band's positions (and what it dropped) itself.
    top = getattr(cl.compressor, "top", 0.0)
    band = getattr(cl.compressor, "last_dropped", None)
    dropped_l1 = sum(float(d.double().abs().sum()) for _, d in band) if band else 0.0
    top_n = top_never = top_again = 0
    fresh_n = fresh_sent = 0
    if top > 0:  # this round's largest gradient entries that went out anyway
        for i, (u, layer) in enumerate(zip(update, payload.layers)):
            uf = u.detach().reshape(-1).cpu()
            k_top = band_counts(uf.numel(), top, getattr(cl.compressor, "keep", 0.0))[0]
            if not k_top:
                continue
            fresh = ops.select(uf, 0.0, top)[0]
            sent_now = torch.zeros(uf.numel(), dtype=torch.bool)
            if layer.indices is None:
                sent_now[:] = True
            else:
                sent_now[layer.indices.cpu()] = True
            fresh_n += k_top
            fresh_sent += int(sent_now[fresh].sum())
    if res is not None and top > 0:
        held = [torch.zeros(s.numel(), dtype=torch.bool) for s in cl.ever_sent]
        for i, (e, sent) in enumerate(zip(res, cl.ever_sent)):
            k_top = band_counts(e.numel(), top, getattr(cl.compressor, "keep", 0.0))[0]
            if k_top:
                if band is not None:
                    idx = band[i][0].cpu()
                else:
                    idx = e.detach().reshape(-1).abs().cpu().topk(k_top).indices
                top_n += k_top
                top_never += int((~sent[idx]).sum())
                held[i][idx] = True
                if cl.top_held is not None:
                    top_again += int(cl.top_held[i][idx].sum())
        had_previous = cl.top_held is not None
        cl.top_held = held
    else:
        had_previous = False
    return {
        "grad_norm": math.sqrt(g2),
        "residual_norm": math.sqrt(e2),
        "residual_never_sent_norm": math.sqrt(never2),
        "never_sent_fraction": never / max(1, total),
        "residual_never_sent_share": never2 / e2 if e2 > 0 else 0.0,
        "grad_never_sent_share": g2_never / g2 if g2 > 0 else 0.0,
        "residual_max_abs": emax,
        "top_never_sent_fraction": top_never / top_n if top_n else 0.0,
        "top_repeat_fraction": top_again / top_n if top_n and had_previous else 0.0,
        "top_dropped_l1": dropped_l1,
        "fresh_top_sent_fraction": fresh_sent / fresh_n if fresh_n else 0.0,
    }
