"""Defense specs: the one syntax for choosing a defense and its parameters.

A spec is a defense name, optionally followed by ``:`` and ``key=value`` pairs separated by
commas::

    none
    dgp                      # the defaults (top=0.05, keep=0.2)
    dgp:top=0.1
    dgp:top=0.02,keep=0.1,value_dtype=bfloat16
    topk:keep=0.2

The same strings are accepted by ``dgp train --defenses``, ``dgp evaluate --defenses``,
:class:`dgp_kernels.sim.SimConfig` (``defense="dgp:top=0.1"``) and the attack API
(:func:`dgp_kernels.attacks.apply_defense`). This module only reads the syntax; which
parameters a defense takes, and their types, are checked by the layer that uses them (the
compressor's keyword arguments for training, :data:`dgp_kernels.attacks.DEFENSE_PARAMS`
for the attack evaluation).

Several specs can also be written as one comma-separated list: a comma item without ``=``
starts a new spec, an item ``key=value`` continues the one before it, so
``none,dgp:top=0.1,keep=0.2,topk`` is ``["none", "dgp:top=0.1,keep=0.2", "topk"]``
(:func:`split_specs`).
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Tuple

__all__ = ["format_spec", "parse_spec", "parse_value", "split_specs"]


def parse_value(text: str) -> Any:
    """A spec value: ``true``/``false`` -> bool, ``none`` -> None, an int literal -> int, a
    float literal -> float, anything else stays a str (e.g. ``bfloat16``)."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text.strip()


def parse_spec(spec: object) -> Tuple[str, Dict[str, str]]:
    """``"dgp:top=0.1,keep=0.2"`` -> ``("dgp", {"top": "0.1", "keep": "0.2"})``.

    The name is stripped and lower-cased; values are returned as written (stripped), for the
    caller to convert (:func:`parse_value`, or a per-parameter type). Raises ``TypeError``
    for a non-str and ``ValueError`` naming the spec for an empty name, an item that is not
    ``key=value``, a key given twice, or nothing after ``:``.
    """
    if not isinstance(spec, str):
        raise TypeError(f"defense spec must be a str, got {type(spec).__name__} {spec!r}")
    text = spec.strip()
    name, colon, rest = text.partition(":")
    name = name.strip().lower()
    if not name:
        raise ValueError(f"defense {spec!r}: no defense name (write e.g. 'dgp' or 'dgp:top=0.1')")
    params: Dict[str, str] = {}
    if colon and not rest.strip():
        raise ValueError(f"defense {spec!r}: nothing after ':' (write {name!r} for the defaults)")
    if rest.strip():
        for item in rest.split(","):
            key, eq, val = item.partition("=")
            key, val = key.strip(), val.strip()
            if not eq or not key or not val:
                raise ValueError(
                    f"defense {spec!r}: expected param=value pairs separated by commas, got {item!r}"
                )
            if key in params:
                raise ValueError(f"defense {spec!r}: parameter {key!r} given twice")
            params[key] = val
    return name, params


def split_specs(items: Iterable[str]) -> List[str]:
    """Specs from command-line words, each word one spec or a comma-separated list of them:
    ``["none,dgp:top=0.1,keep=0.2", "topk"]`` -> ``["none", "dgp:top=0.1,keep=0.2", "topk"]``.

    A comma item without ``=`` starts a spec; a ``key=value`` item continues the previous
    one. Raises ``ValueError`` when a word starts with a ``key=value`` item.
    """
    out: List[str] = []
    for word in items:
        if not isinstance(word, str):
            raise TypeError(f"defense spec must be a str, got {type(word).__name__} {word!r}")
        current: List[str] = []
        for item in word.split(","):
            piece = item.strip()
            if not piece:
                continue
            if "=" in piece and ":" not in piece.split("=", 1)[0]:
                if not current:
                    raise ValueError(
                        f"defense {word!r}: {piece!r} has no defense name before it (write "
                        "NAME:KEY=VALUE,..., e.g. dgp:top=0.1,keep=0.2)"
                    )
                current.append(piece)
            else:
                if current:
                    out.append(",".join(current))
                current = [piece]
        if current:
            out.append(",".join(current))
    return out


def format_spec(name: str, params: Mapping[str, Any]) -> str:
    """The spec string of ``name`` with ``params`` (``"dgp:top=0.1"``; ``"dgp"`` when empty)."""
    if not params:
        return name
    def fmt(v: Any) -> str:
        return f"{v:g}" if isinstance(v, float) else str(v)
    return name + ":" + ",".join(f"{k}={fmt(v)}" for k, v in params.items())
