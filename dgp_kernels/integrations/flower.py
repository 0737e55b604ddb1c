"""Flower integration: a client mod that DGP-compresses each fit reply and a server strategy
that decodes and aggregates (``pip install "dgp_kernels[flower]"``).

Route: Flower's **Message API** (``flwr.serverapp.strategy`` first ships in flwr 1.21; built
and tested against 1.42): ``flwr.clientapp.ClientApp(mods=[...])`` on the client, a
subclass of ``flwr.serverapp.strategy.FedAvg`` driven by ``strategy.start(grid=..., ...)``
in a ``flwr.serverapp.ServerApp`` on the server. The older ``NumPyClient`` /
``flwr.server.strategy`` (``fit``/``FitRes``) route now lives in ``flwr.compat``
("deprecated legacy components") and is not supported. The mod has the ``Mod`` signature ``(msg, context, call_next) -> Message``
(``flwr.clientapp.typing.Mod``), the same as Flower's own ``flwr.clientapp.mod`` mods.

Client (:class:`DGPMod`, or the default instance :data:`dgp_mod`)::

    app = ClientApp(mods=[DGPMod("dgp", {"top": 0.05, "keep": 0.20})])

For every ``train`` message, the mod lets the client train (``call_next``), then replaces
the reply's ``ArrayRecord`` (key ``"arrays"`` by default) by

* ``"dgp.payload"``: a 1-D ``uint8`` array holding the wire-format v1 bytes of the
  compressed **update** ``local - global`` of every floating-point array (in the record's
  key order; the global arrays are the ones the server sent in the same message), and
* the non-floating arrays (e.g. BatchNorm's ``num_batches_tracked``) unchanged.

Error feedback: the compressor's state (per-array residuals, generator state, round
counter) lives in the client's ``context.state`` (a ``RecordDict``: ``ArrayRecord``
``"dgp.residuals"`` and ``ConfigRecord`` ``"dgp.state"``), so it survives between rounds
whether the ``ClientApp`` object is rebuilt (simulation actors) or not (SuperNode).

Server (:class:`DGPFedAvg`, a drop-in for ``FedAvg``): ``aggregate_train`` decodes every
reply's payload with :func:`dgp_kernels.codec.decode_accumulate` (every payload is
validated completely before anything is added), computes

    new = global + sum_c w_c * update_c / sum_c w_c      (w_c: the reply's "num-examples")

over the accepted replies (summed in float32 in node-id order, so reproducible) and
averages the non-floating arrays the same way (rounded back to their dtype). A reply without a usable payload or weight, or whose payload is rejected
by the decoder (wrong model, truncated, corrupted, NaN/inf values, ...), is dropped with
its reason logged on the ``"dgp_kernels"`` logger and in :attr:`DGPFedAvg.history`; it
contributes nothing to the aggregate. If no reply is usable the global model is kept.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

try:
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
    from flwr.serverapp.strategy import FedAvg
except ImportError as _exc:  # pragma: no cover - exercised only without flwr
    from ..optional import install_hint

    raise ImportError(
        "dgp_kernels.integrations.flower needs Flower (flwr >= 1.21, the Message API): "
        + install_hint("flower")
    ) from _exc

from ..codec import decode_accumulate, encode
from ..compressor import ADGPCompressor, Compressor, available_compressors, get_compressor

__all__ = [
    "PAYLOAD_KEY",
    "DGPMod",
    "dgp_mod",
    "DGPFedAvg",
    "RoundTraffic",
    "ClientUpload",
    "encode_update",
    "aggregate_updates",
]

log = logging.getLogger("dgp_kernels")

#: Name of the Array holding the encoded payload inside the reply's ArrayRecord.
PAYLOAD_KEY = "dgp.payload"
_RESIDUALS = "dgp.residuals"
_STATE = "dgp.state"
_RNG = "__rng__"


def _is_float(a: np.ndarray) -> bool:
    return a.dtype.kind == "f"


def _record_arrays(rec: ArrayRecord, what: str) -> Dict[str, np.ndarray]:
    if not isinstance(rec, ArrayRecord):
        raise TypeError(f"{what} must be an ArrayRecord, got {type(rec).__name__}")
    return {k: rec[k].numpy() for k in rec.keys()}


# --------------------------------------------------------------------------------------
# Client side.
# --------------------------------------------------------------------------------------
def encode_update(
    global_arrays: Dict[str, np.ndarray], local_arrays: Dict[str, np.ndarray], compressor: Compressor,
    value_dtype: Optional[str] = None,
) -> Tuple[bytes, Dict[str, np.ndarray]]:
    """Compress and encode one client's update (the pure core of :class:`DGPMod`).

    Args:
        global_arrays: the arrays the server sent (name -> ndarray), in record order.
        local_arrays: the client's arrays after training: the same names and shapes.
        compressor: the client's compressor (its error-feedback memory is updated).
        value_dtype: optional re-encoding of the values (see :func:`dgp_kernels.codec.encode`).

    Returns:
        ``(payload_bytes, passthrough)``: the wire bytes of the compressed ``local - global``
        of every floating array (float16/32/64; one payload layer per array, in order), and
        the non-floating local arrays, unchanged.

    Raises ``ValueError`` naming the array when the names, shapes or dtypes disagree.
    """
    if list(local_arrays) != list(global_arrays):
        raise ValueError(
            f"the trained arrays {list(local_arrays)} do not match the arrays the server sent "
            f"{list(global_arrays)} (same names, same order)"
        )
    deltas: List[torch.Tensor] = []
    passthrough: Dict[str, np.ndarray] = {}
    for name, g in global_arrays.items():
        x = local_arrays[name]
        if x.shape != g.shape or x.dtype != g.dtype:
            raise ValueError(
                f"array {name!r}: trained {x.shape} {x.dtype} vs sent {g.shape} {g.dtype}"
            )
        if _is_float(g):
            deltas.append(torch.from_numpy(np.ascontiguousarray(x)) - torch.from_numpy(np.ascontiguousarray(g)))
        else:
            passthrough[name] = x
    payload = compressor.compress(deltas)
    return encode(payload, value_dtype), passthrough


def _load_compressor(state: RecordDict, name: str, params: Dict[str, Any]) -> Compressor:
    comp = get_compressor(name, **params)
    if _STATE not in state:
        return comp
    cfg = state[_STATE]
    sd = comp.state_dict()
    saved_params = json.loads(str(cfg["params"]))
    if cfg["compressor"] != name:
        raise ValueError(
            f"this client's context holds state of compressor {cfg['compressor']!r} but the mod "
            f"uses {name!r}; clear context.state['{_STATE}'] to start over"
        )
    sd["params"] = saved_params
    sd["rounds"] = int(cfg["rounds"])
    sd["seed"] = int(cfg["seed"]) if "seed" in cfg else None
    res_rec = state[_RESIDUALS] if _RESIDUALS in state else None
    residuals = None
    if res_rec is not None:
        keys = [k for k in res_rec.keys() if k != _RNG]
        if keys:
            residuals = [torch.from_numpy(res_rec[k].numpy().copy()) for k in keys]
        if _RNG in res_rec:
            sd["rng"] = torch.from_numpy(res_rec[_RNG].numpy().copy())
    sd["memory"] = {"residuals": residuals}
    comp.load_state_dict(sd)
    return comp


def _save_compressor(state: RecordDict, comp: Compressor, names: Sequence[str]) -> None:
    sd = comp.state_dict()
    cfg: Dict[str, Any] = {
        "compressor": comp.name,
        "params": json.dumps(sd["params"], sort_keys=True),
        "rounds": int(sd["rounds"]),
    }
    if sd["seed"] is not None:
        cfg["seed"] = int(sd["seed"])
    arrays: Dict[str, Array] = {}
    res = sd["memory"]["residuals"]
    if res is not None:
        if len(res) != len(names):
            raise RuntimeError(f"{len(res)} residuals for {len(names)} floating arrays")
        for n, e in zip(names, res):
            arrays[n] = Array(e.numpy())
    if sd["rng"] is not None:
        arrays[_RNG] = Array(sd["rng"].numpy())
    state[_STATE] = ConfigRecord(cfg)
    state[_RESIDUALS] = ArrayRecord(arrays)


class DGPMod:
    """Flower client mod: compress the update in every ``train`` reply (see the module
    docstring).

    Args:
        compressor: a registered compressor name (default ``"dgp"``; ``"adgp"`` is not
            supported here: it needs the broadcaster's positions).
        params: the compressor's keyword arguments (``get_compressor(name, **params)``);
            default DGP: ``top=0.05, keep=0.20``, error feedback on, float32 values.
        arrayrecord_key: key of the ``ArrayRecord`` in the server's message and in the
            client's reply (``FedAvg``'s ``arrayrecord_key``, default ``"arrays"``).
        value_dtype: optional re-encoding of values on the wire (``"bfloat16"`` ...);
            prefer the compressor's own ``value_dtype``, which feeds the rounding error back.
    """

    def __init__(
        self,
        compressor: str = "dgp",
        params: Optional[Dict[str, Any]] = None,
        *,
        arrayrecord_key: str = "arrays",
        value_dtype: Optional[str] = None,
    ) -> None:
        if not isinstance(compressor, str) or compressor not in available_compressors():
            raise ValueError(f"compressor must be one of {available_compressors()}, got {compressor!r}")
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise TypeError(f"params must be a dict of compressor arguments, got {type(params).__name__}")
        probe = get_compressor(compressor, **params)  # TypeError/ValueError naming the parameter
        if isinstance(probe, ADGPCompressor):
            raise ValueError("compressor 'adgp' needs broadcast positions; use 'dgp' with the Flower mod")
        if not isinstance(arrayrecord_key, str) or not arrayrecord_key:
            raise TypeError(f"arrayrecord_key must be a non-empty str, got {arrayrecord_key!r}")
        if value_dtype is not None and value_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"value_dtype must be None, 'float32', 'bfloat16' or 'float16', got {value_dtype!r}")
        self.compressor = compressor
        self.params = dict(params)
        self.arrayrecord_key = arrayrecord_key
        self.value_dtype = value_dtype

    def __call__(self, msg: Message, context: Context, call_next) -> Message:
        if msg.metadata.message_type.split(".")[0] != MessageType.TRAIN:
            return call_next(msg, context)
        key = self.arrayrecord_key
        if key not in msg.content.array_records:
            raise ValueError(
                f"DGPMod: the train message has no ArrayRecord {key!r} (it has "
                f"{list(msg.content.array_records)}); set arrayrecord_key"
            )
        global_arrays = _record_arrays(msg.content[key], f"message[{key!r}]")  # copies
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        if key not in reply.content.array_records:
            raise ValueError(
                f"DGPMod: the ClientApp's train reply has no ArrayRecord {key!r} (it has "
                f"{list(reply.content.array_records)})"
            )
        local_arrays = _record_arrays(reply.content[key], f"reply[{key!r}]")
        comp = _load_compressor(context.state, self.compressor, self.params)
        data, passthrough = encode_update(global_arrays, local_arrays, comp, self.value_dtype)
        _save_compressor(context.state, comp, [n for n, a in global_arrays.items() if _is_float(a)])
        out = {PAYLOAD_KEY: Array(np.frombuffer(data, dtype=np.uint8).copy())}
        out.update({n: Array(a) for n, a in passthrough.items()})
        reply.content[key] = ArrayRecord(out)
        return reply


#: A :class:`DGPMod` with the paper's defaults (DGP, top 5 %, keep 20 %, error feedback).
dgp_mod = DGPMod()


# --------------------------------------------------------------------------------------
# Server side.
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClientUpload:
    """One client's reply as the server aggregates it.

    Attributes:
        node: the Flower node id (for logs).
        payload: the wire bytes (``None`` when the reply carried none).
        weight: the FedAvg weight (e.g. ``num-examples``).
        passthrough: the reply's non-floating arrays.
        problem: why the reply is unusable before decoding (``None`` when it is usable).
    """

    node: int
    payload: Optional[bytes]
    weight: float
    passthrough: Dict[str, np.ndarray]
    problem: Optional[str] = None


@dataclass(frozen=True)
class RoundTraffic:
    """What :class:`DGPFedAvg` received in one training round.

    Attributes:
        round: the server round.
        accepted: node ids whose updates were aggregated.
        upload_bytes: payload bytes of each accepted node, in the same order.
        rejected: ``(node id, reason)`` of every dropped reply.
        dense_bytes: bytes of the floating model arrays sent down (the dense reference).
    """

    round: int
    accepted: Tuple[int, ...]
    upload_bytes: Tuple[int, ...]
    rejected: Tuple[Tuple[int, str], ...]
    dense_bytes: int

    @property
    def upload_ratio(self) -> float:
        """Mean accepted upload relative to ``dense_bytes``."""
        if not self.upload_bytes or not self.dense_bytes:
            return 0.0
        return sum(self.upload_bytes) / (len(self.upload_bytes) * self.dense_bytes)


def aggregate_updates(
    global_arrays: Dict[str, np.ndarray], uploads: Sequence[ClientUpload], *, allow_nonfinite: bool = False,
) -> Tuple[Optional[Dict[str, np.ndarray]], List[int], List[Tuple[int, str]]]:
    """Decode, validate and average the clients' updates (the pure core of
    :meth:`DGPFedAvg.aggregate_train`).

    Returns ``(new_arrays, accepted_nodes, rejected)``: ``new_arrays`` is ``None`` when no
    upload was usable (keep the global model). Floating arrays: ``global + weighted mean of
    the decoded updates`` (accumulated in float32, clients in the given order, then cast to
    the array's dtype); non-floating arrays: the weighted mean of the accepted clients'
    arrays, rounded to the dtype. A rejected upload contributes nothing.
    """
    float_names = [n for n, a in global_arrays.items() if _is_float(a)]
    other_names = [n for n in global_arrays if n not in float_names]
    rejected: List[Tuple[int, str]] = []
    usable: List[ClientUpload] = []
    for up in uploads:
        reason = up.problem
        if reason is None and up.payload is None:
            reason = f"no {PAYLOAD_KEY!r} array in the reply"
        if reason is None and (not math.isfinite(up.weight) or up.weight <= 0):
            reason = f"weight must be finite and > 0, got {up.weight!r}"
        if reason is None:
            for n in other_names:
                a = up.passthrough.get(n)
                if a is None or a.shape != global_arrays[n].shape:
                    reason = f"non-floating array {n!r} missing or of another shape"
                    break
        if reason is None:
            usable.append(up)
        else:
            rejected.append((up.node, reason))
    if not usable:
        return None, [], rejected
    outs = [torch.zeros(int(global_arrays[n].size), dtype=torch.float32) for n in float_names]
    report = decode_accumulate(
        [u.payload for u in usable], outs, weights=[u.weight for u in usable],
        allow_nonfinite=allow_nonfinite,
    )
    for r in report.rejected:
        rejected.append((usable[r.client].node, r.reason))
    accepted = [usable[c] for c in report.accepted]
    if not accepted or report.weight_sum <= 0:
        return None, [], rejected
    wsum = report.weight_sum
    new: Dict[str, np.ndarray] = {}
    out_by_name = dict(zip(float_names, outs))
    for n, g in global_arrays.items():
        if n in out_by_name:
            upd = (out_by_name[n] / wsum).numpy().reshape(g.shape)
            wide = np.float64 if g.dtype == np.float64 else np.float32
            val = g.astype(wide) + upd.astype(wide)
        else:
            acc = sum(u.weight * u.passthrough[n].astype(np.float64) for u in accepted) / wsum
            val = np.rint(acc) if g.dtype.kind in "iub" else acc
        # np.asarray: 0-d arithmetic gives numpy scalars, which Flower's Array rejects
        new[n] = np.asarray(val).astype(g.dtype).reshape(g.shape)
    return new, [u.node for u in accepted], rejected


class DGPFedAvg(FedAvg):
    """``FedAvg`` whose clients upload DGP payloads (from :class:`DGPMod`).

    Takes every ``FedAvg`` argument (``fraction_train``, ``min_available_nodes``,
    ``weighted_by_key``, ``arrayrecord_key``, ...), plus:

    Args:
        allow_nonfinite: accept NaN/inf values in payloads (default False: rejected, so one
            client cannot poison the model).

    Attributes:
        history: one :class:`RoundTraffic` per training round (bytes received, accepted and
            rejected nodes with reasons).
    """

    def __init__(self, *args: Any, allow_nonfinite: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.allow_nonfinite = bool(allow_nonfinite)
        self.history: List[RoundTraffic] = []
        self._sent: Dict[int, Dict[str, np.ndarray]] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid) -> Iterable[Message]:
        """FedAvg's sampling; also remembers the arrays sent (the base of the updates)."""
        self._sent = {server_round: _record_arrays(arrays, "arrays")}
        return super().configure_train(server_round, arrays, config, grid)

    def _upload(self, msg: Message) -> ClientUpload:
        node = int(msg.metadata.src_node_id)
        content = msg.content
        key = self.arrayrecord_key
        if key not in content.array_records:
            return ClientUpload(node, None, 0.0, {}, f"no ArrayRecord {key!r} in the reply")
        rec = content[key]
        if PAYLOAD_KEY not in rec:
            return ClientUpload(node, None, 0.0, {}, f"no {PAYLOAD_KEY!r} array (is DGPMod in the ClientApp's mods?)")
        raw = rec[PAYLOAD_KEY].numpy()
        if raw.dtype != np.uint8 or raw.ndim != 1:
            return ClientUpload(node, None, 0.0, {}, f"{PAYLOAD_KEY!r} must be 1-D uint8, got {raw.dtype} {raw.shape}")
        weight = float("nan")
        metrics = list(content.metric_records.values())
        if len(metrics) == 1 and self.weighted_by_key in metrics[0]:
            w = metrics[0][self.weighted_by_key]
            if isinstance(w, (int, float)) and not isinstance(w, bool):
                weight = float(w)
        passthrough = {k: rec[k].numpy() for k in rec.keys() if k != PAYLOAD_KEY}
        problem = None if math.isfinite(weight) else (
            f"one MetricRecord with a numeric {self.weighted_by_key!r} is required")
        return ClientUpload(node, raw.tobytes(), weight, passthrough, problem)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> Tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        """Decode and average the DGP updates; drop (and log) every unusable reply."""
        replies = list(replies)
        base = self._sent.get(server_round)
        if base is None:
            raise RuntimeError(f"DGPFedAvg.aggregate_train({server_round}) without configure_train for that round")
        uploads: List[ClientUpload] = []
        errors: List[Tuple[int, str]] = []
        for msg in replies:
            if msg.has_error():
                errors.append((int(msg.metadata.src_node_id), f"client error: {msg.error.reason}"))
            else:
                uploads.append(self._upload(msg))
        # Replies arrive in any order; sum them by node id so the float32 aggregate is
        # reproducible run to run.
        uploads.sort(key=lambda u: u.node)
        new, accepted, rejected = aggregate_updates(base, uploads, allow_nonfinite=self.allow_nonfinite)
        rejected = errors + rejected
        for node, reason in rejected:
            log.warning("DGPFedAvg round %d: dropped the reply of node %d: %s", server_round, node, reason)
        sizes = {u.node: len(u.payload) for u in uploads if u.payload is not None}
        dense = sum(int(a.nbytes) for a in base.values() if _is_float(a))
        self.history.append(RoundTraffic(
            server_round, tuple(accepted), tuple(sizes[n] for n in accepted), tuple(rejected), dense))
        if new is None:
            log.warning("DGPFedAvg round %d: no usable reply; the global model is kept", server_round)
            return None, None
        ok = set(accepted)
        contents = [m.content for m in replies if not m.has_error() and int(m.metadata.src_node_id) in ok]
        metrics = None
        try:
            metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        except Exception as exc:  # metrics are advisory: never lose the model update for them
            log.warning("DGPFedAvg round %d: train metrics not aggregated: %s", server_round, exc)
        return ArrayRecord({n: Array(a) for n, a in new.items()}), metrics
