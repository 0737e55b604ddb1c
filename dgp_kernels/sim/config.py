"""Simulator configuration: :class:`SimConfig` (one run), :class:`Fault` (an injected client
failure) and the parsing of defense specs (``dgp:top=0.1,keep=0.2``, :mod:`dgp_kernels.spec`).

Every field is checked once, in :meth:`SimConfig.validate` (called by
:func:`~dgp_kernels.sim.simulate`), with a ``TypeError``/``ValueError`` that names the field
(or the command-line flag it came from), its value and what is allowed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..checks import check_choice, check_float, check_int
from ..spec import format_spec, parse_spec, parse_value, split_specs

__all__ = [
    "ALGORITHMS",
    "DEFENSES",
    "FAULT_KINDS",
    "SPLITS",
    "Fault",
    "SimConfig",
    "parse_defenses",
    "parse_value",
]

#: Training algorithms: FedSGD (one gradient per client per round, server optimiser) and
#: FedAvg (local epochs, clients send model deltas).
ALGORITHMS = ("fedsgd", "fedavg")
#: Data partitions across clients.
SPLITS = ("iid", "dirichlet")
#: Defenses = registered compressor names (dgp_kernels.compressor.available_compressors()).
DEFENSES = ("none", "dgp", "adgp", "topk", "randk", "dp", "qsgd")
#: Extra ``adgp`` parameters that configure the server-side Broadcaster, not the client.
ADGP_BROADCASTER_PARAMS = ("top", "keep", "positions")
#: How the ADGP broadcaster picks positions after round 1.
ADGP_POSITION_RULES = ("fresh", "gradient", "aggregate")

#: Ways a client can fail in a round (see :class:`Fault`).
FAULT_KINDS = ("raise", "absent", "corrupt", "truncate", "nan_payload")


@dataclass(frozen=True)
class Fault:
    """A failure injected into one client in one round (tests, robustness studies).

    Attributes:
        round: 0-based round number.
        client: client id in ``[0, clients)``; ignored unless that client is sampled.
        kind: ``"raise"`` (local training raises after computing its update),
            ``"absent"`` (the client never answers), ``"corrupt"`` (one byte of its payload
            is flipped in transit: the checksum fails), ``"truncate"`` (the payload loses
            its last bytes), ``"nan_payload"`` (a well-formed payload carrying a NaN value).
            The server drops the client from that round with the reason; the payload
            bytes that arrived are still counted as upload.
    """

    round: int
    client: int
    kind: str = "raise"

    def __post_init__(self) -> None:
        for name in ("round", "client"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"Fault.{name} must be an int >= 0, got {v!r}")
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"Fault.kind must be one of {FAULT_KINDS}, got {self.kind!r}")


# ``name`` is the whole label of the value in messages ("SimConfig.rounds", "--rounds").
def _check_int(value: object, name: str, lo: int) -> int:
    return check_int(value, name, min_value=lo)


def _check_float(value: object, name: str, lo: float, hi: float = math.inf, *,
                 lo_open: bool = False) -> float:
    return check_float(value, name, min_value=lo, max_value=hi, min_inclusive=not lo_open)


def _check_choice(value: object, name: str, choices: Sequence[str]) -> str:
    return check_choice(value, name, choices)


@dataclass
class SimConfig:
    """One simulated collaborative-learning run (all fields JSON-serialisable).

    Attributes:
        dataset: ``digits`` (built in, offline), ``mnist``, ``cifar10``, ``cifar100`` (from
            ``data_root``).
        model: a name of :data:`dgp_kernels.cases.models.MODELS`; built with the dataset's
            ``num_classes``/``channels`` (and ``image_size`` when the model takes it).
        defense: compressor name (``none``, ``dgp``, ``adgp``, ``topk``, ``randk``, ``dp``,
            ``qsgd``); each client gets its own compressor object (own error feedback).
            A defense spec (``"dgp:top=0.1,keep=0.2"``, :mod:`dgp_kernels.spec`) is accepted
            too: its parameters move into ``defense_params``.
        defense_params: keyword arguments of that compressor (``{"top": 0.05}``); for
            ``adgp`` also ``top``/``keep`` (the broadcaster's band) and ``positions``
            (``"fresh"``, the default: band of the broadcaster's own gradient each round;
            ``"aggregate"``: band of the previous round's aggregate, which leaves most
            coordinates unsent, see :mod:`dgp_kernels.compressor.adgp`).
            Random compressors get ``seed + client`` per client (``seed`` defaults to a
            value derived from ``SimConfig.seed``).
        clients: number of clients N.
        rounds: communication rounds.
        algorithm: ``fedsgd`` (each sampled client sends one gradient on one local batch;
            the server averages and steps SGD with momentum/weight decay) or ``fedavg``
            (``local_epochs`` of local SGD; clients send model deltas; the server adds
            the sample-weighted mean delta).
        batch_size: local batch size.
        lr, momentum, weight_decay: SGD hyper-parameters (server optimiser in FedSGD,
            clients' local optimiser in FedAvg).
        lr_steps: ``[[round, lr], ...]``: from that 0-based round on, use that lr (the DGP
            authors' 0.1 -> 0.01 -> 0.005 schedule is ``[[51, 0.01], [71, 0.005]]`` in epochs).
        local_epochs: FedAvg local epochs E.
        participation: fraction of clients sampled per round (at least one).
        split: ``iid`` or ``dirichlet`` (label proportions per client ~ Dir(alpha)).
        alpha: Dirichlet concentration (> 0; small = more skewed).
        seed: seeds model init, split, sampling, batches and compressors.
        data_root: directory holding MNIST/CIFAR files (ignored for ``digits``).
        device: torch device for local training (``cpu``, ``cuda``, ...); the server side
            (codec) runs on CPU.
        eval_every: evaluate on the test split every this many rounds (and after the last).
        test_limit: evaluate on at most this many test samples (0 = all).
        diagnostics: also record error-feedback diagnostics per round (residual norms on
            never-sent coordinates; see :func:`~dgp_kernels.sim.simulate`).
        threads: torch intra-op threads during the run (restored afterwards); ``None``
            leaves torch's setting. Small models run fastest on 1 thread here (an OpenMP
            region can stall ~8 ms on a 2-vCPU machine); results are bitwise
            reproducible for a fixed thread count.
    """

    dataset: str = "digits"
    model: str = "convnet_small"
    defense: str = "none"
    defense_params: Dict[str, Any] = field(default_factory=dict)
    clients: int = 10
    rounds: int = 150
    algorithm: str = "fedsgd"
    batch_size: int = 32
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_steps: List[Tuple[int, float]] = field(default_factory=list)
    local_epochs: int = 1
    participation: float = 1.0
    split: str = "iid"
    alpha: float = 0.5
    seed: int = 0
    data_root: Optional[str] = None
    device: str = "cpu"
    eval_every: int = 1
    test_limit: int = 0
    diagnostics: bool = False
    threads: Optional[int] = None

    # ---------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        # A defense spec string ("dgp:top=0.1,keep=0.2", the syntax of dgp_kernels.spec)
        # is split into ``defense`` and ``defense_params`` here, so the stored config (and
        # its JSON) always holds the plain name and a dict.
        if isinstance(self.defense, str) and ":" in self.defense:
            name, params = _spec_params(self.defense, "SimConfig.defense")
            if isinstance(self.defense_params, Mapping):
                both = sorted(set(params) & set(self.defense_params))
                if both:
                    raise ValueError(
                        f"SimConfig: {both} given both in defense {self.defense!r} and in "
                        "defense_params; give each parameter once"
                    )
                params = {**self.defense_params, **params}
            self.defense, self.defense_params = name, params

    # ---------------------------------------------------------------------------------
    def validate(self, names: Optional[Mapping[str, str]] = None) -> "SimConfig":
        """Check every field (raises ``TypeError``/``ValueError`` naming it); returns self.

        ``names`` maps field names to what the messages call them (the command line passes
        ``{"rounds": "--rounds", ...}``); fields not in it are called ``SimConfig.<field>``.
        """
        from ..cases.datasets import available_datasets
        from ..cases.models import MODELS

        def n(field_name: str) -> str:
            return (names or {}).get(field_name, f"SimConfig.{field_name}")

        _check_choice(self.dataset, n("dataset"), available_datasets())
        _check_choice(self.model, n("model"), sorted(MODELS))
        _check_choice(self.defense, n("defense"), DEFENSES)
        if not isinstance(self.defense_params, Mapping):
            raise TypeError(
                f"{n('defense_params')} must be a dict of compressor keyword arguments, "
                f"got {type(self.defense_params).__name__}"
            )
        for k in self.defense_params:
            if not isinstance(k, str):
                raise TypeError(f"{n('defense_params')} keys must be str, got {k!r}")
        _check_int(self.clients, n("clients"), 1)
        _check_int(self.rounds, n("rounds"), 1)
        _check_choice(self.algorithm, n("algorithm"), ALGORITHMS)
        _check_int(self.batch_size, n("batch_size"), 1)
        _check_float(self.lr, n("lr"), 0.0, lo_open=True)
        _check_float(self.momentum, n("momentum"), 0.0, 1.0)
        _check_float(self.weight_decay, n("weight_decay"), 0.0)
        if not isinstance(self.lr_steps, (list, tuple)):
            raise TypeError(f"{n('lr_steps')} must be a list of [round, lr] pairs, got {self.lr_steps!r}")
        for i, step in enumerate(self.lr_steps):
            if not isinstance(step, (list, tuple)) or len(step) != 2:
                raise ValueError(f"{n('lr_steps')}[{i}] must be a [round, lr] pair, got {step!r}")
            _check_int(step[0], f"{n('lr_steps')}[{i}] round", 0)
            _check_float(step[1], f"{n('lr_steps')}[{i}] lr", 0.0, lo_open=True)
        _check_int(self.local_epochs, n("local_epochs"), 1)
        _check_float(self.participation, n("participation"), 0.0, 1.0, lo_open=True)
        _check_choice(self.split, n("split"), SPLITS)
        _check_float(self.alpha, n("alpha"), 0.0, lo_open=True)
        _check_int(self.seed, n("seed"), 0)
        if self.data_root is not None and not isinstance(self.data_root, str):
            raise TypeError(f"{n('data_root')} must be a str path or None, got {self.data_root!r}")
        if not isinstance(self.device, str):
            raise TypeError(f"{n('device')} must be a str such as 'cpu' or 'cuda', got {self.device!r}")
        try:
            import torch

            torch.device(self.device)
        except (RuntimeError, ValueError) as exc:
            raise ValueError(f"{n('device')} {self.device!r} is not a torch device: {exc}") from None
        _check_int(self.eval_every, n("eval_every"), 1)
        _check_int(self.test_limit, n("test_limit"), 0)
        if self.threads is not None:
            _check_int(self.threads, n("threads"), 1)
        if not isinstance(self.diagnostics, bool):
            raise TypeError(f"{n('diagnostics')} must be a bool, got {self.diagnostics!r}")
        spec = format_spec(self.defense, self.defense_params)
        if self.defense == "adgp":
            rule = self.defense_params.get("positions", "fresh")
            if rule not in ADGP_POSITION_RULES:
                raise ValueError(
                    f"{n('defense')} {spec!r}: positions must be one of "
                    f"{', '.join(ADGP_POSITION_RULES)}; got {rule!r}"
                )
        # Build one compressor (and the broadcaster) to check the parameters now, with
        # the compressor's own error naming the parameter.
        # The message names the defense as the caller wrote it: the spec behind the flag
        # (--defenses 'dgp:top=0.9,keep=0.5': ...) or the config's defense ('dgp').
        what = f"{names['defense']} {spec!r}" if names and "defense" in names else f"defense {self.defense!r}"
        try:
            compressor_params(self, client=0, checked=False)
            if self.defense == "adgp":
                from ..compressor import Broadcaster

                Broadcaster(**broadcaster_params(self))
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{what}: {exc}") from None
        return self

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["lr_steps"] = [list(s) for s in self.lr_steps]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SimConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError`` naming them."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown SimConfig fields {unknown}; known: {sorted(known)}")
        return cls(**dict(d))

    def lr_at(self, round: int) -> float:
        """Learning rate in effect at 0-based ``round``."""
        lr = float(self.lr)
        for r, v in sorted((int(a), float(b)) for a, b in self.lr_steps):
            if round >= r:
                lr = v
        return lr


def _client_seed(config: SimConfig, client: int, given: Optional[int]) -> int:
    base = given if given is not None else (config.seed * 1_000_003 + 7919) % (2**62)
    return (int(base) + client) % (2**63 - 1)


def compressor_params(config: SimConfig, client: int, checked: bool = True) -> Dict[str, Any]:
    """The keyword arguments of client ``client``'s compressor, after building a throwaway
    one to check them (errors name the parameter; with ``checked`` they also name the
    defense; :meth:`SimConfig.validate` passes False and names it itself)."""
    from ..compressor import COMPRESSORS, get_compressor

    params = dict(config.defense_params)
    if config.defense == "adgp":
        for k in ADGP_BROADCASTER_PARAMS:
            params.pop(k, None)
    accepted = COMPRESSORS.parameters(config.defense) if config.defense in COMPRESSORS else []
    if "seed" in accepted:
        params["seed"] = _client_seed(config, client, params.get("seed"))
    if not checked:
        get_compressor(config.defense, **params)
        return params
    try:
        get_compressor(config.defense, **params)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"defense {config.defense!r}: {exc}") from None
    return params


def broadcaster_params(config: SimConfig) -> Dict[str, Any]:
    """ADGP broadcaster band (``top``/``keep`` from ``defense_params``, else the DGP defaults)."""
    from ..ops import DEFAULT_KEEP, DEFAULT_TOP

    p = config.defense_params
    return {"top": p.get("top", DEFAULT_TOP), "keep": p.get("keep", DEFAULT_KEEP)}


def _spec_params(spec: str, what: str) -> Tuple[str, Dict[str, Any]]:
    """(name, parameters) of a defense spec string, values converted by :func:`parse_value`."""
    try:
        name, raw = parse_spec(spec)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None
    return name, {k: parse_value(v) for k, v in raw.items()}


def parse_defenses(items: Sequence[str], what: str = "defenses") -> List[Tuple[str, Dict[str, Any]]]:
    """Defense specs (``["none", "dgp:top=0.1,keep=0.2"]``; a word may hold a comma list of
    specs, :func:`dgp_kernels.spec.split_specs`) -> ``[(name, params), ...]``.

    Raises ``ValueError`` prefixed with ``what`` for a malformed spec, an empty list or a
    defense listed twice. Names and parameters are checked by :meth:`SimConfig.validate`.
    """
    try:
        specs = split_specs(items)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None
    if not specs:
        raise ValueError(f"{what} is empty; give e.g. none dgp:top=0.05")
    out = [_spec_params(s, what) for s in specs]
    names = [name for name, _ in out]
    twice = sorted({x for x in names if names.count(x) > 1})
    if twice:
        raise ValueError(
            f"{what} lists {', '.join(twice)} twice: one run per defense name (results are "
            "filed by it)"
        )
    return out
