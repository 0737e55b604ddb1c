"""Argument checks shared by every layer: one wording for every error.

Checks run once, at the boundary where a user's value enters (a constructor, a config's
``validate``, a loader), and raise ``TypeError`` for the wrong type and ``ValueError`` for a
value out of range, naming the argument, its value and what is allowed::

    check_int(rounds, "rounds", min_value=1)           # rounds must be an int >= 1, got 0
    check_float(lr, "lr", min_value=0.0, min_inclusive=False)
    check_fractions(top, keep)                          # DGP's two fractions of one tensor
    check_choice(split, "split", ("iid", "dirichlet"))
    check_seed(seed)                                    # None, or an int in [0, 2**63 - 1]
    check_dtype(value_dtype, "value_dtype", VALUE_DTYPES)

Each returns the checked value (converted where that is the point: ``check_float`` returns
a ``float``, ``check_dtype`` a ``torch.dtype``). ``bool`` is never accepted as a number.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence, TypeVar

import torch

__all__ = [
    "FRACTION_SUM_TOL",
    "VALUE_DTYPES",
    "check_bool",
    "check_choice",
    "check_dtype",
    "check_float",
    "check_fraction",
    "check_fractions",
    "check_int",
    "check_seed",
    "dtype_name",
]

#: Dtypes a payload may carry its values in (float32 is exact; the 16-bit ones are lossy and
#: opt-in). The wire codec, the compressors and the integrations all read this one table.
VALUE_DTYPES: Mapping[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

#: Tolerance on ``top + keep <= 1``, so that 0.7 + 0.3 (1.0000000000000002 in binary) passes.
FRACTION_SUM_TOL = 1e-9

S = TypeVar("S")


def _type_name(value: object) -> str:
    return type(value).__name__


def check_bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {_type_name(value)} {value!r}")
    return value


def check_int(value: object, name: str, *, min_value: Optional[int] = None,
              max_value: Optional[int] = None) -> int:
    """An ``int`` (not ``bool``) in ``[min_value, max_value]`` (either bound optional)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {_type_name(value)} {value!r}")
    if (min_value is not None and value < min_value) or (max_value is not None and value > max_value):
        lo = f" >= {min_value}" if min_value is not None else ""
        hi = f"{' and' if lo else ''} <= {max_value}" if max_value is not None else ""
        raise ValueError(f"{name} must be an int{lo}{hi}, got {value!r}")
    return int(value)


def check_float(value: object, name: str, *, min_value: float = -math.inf,
                max_value: float = math.inf, min_inclusive: bool = True) -> float:
    """A finite real number (``int`` or ``float``, not ``bool``) in the given range;
    returned as ``float``. ``min_inclusive=False`` makes the lower bound strict."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {_type_name(value)} {value!r}")
    v = float(value)
    too_low = v < min_value if min_inclusive else v <= min_value
    if not math.isfinite(v) or too_low or v > max_value:
        parts = []
        if min_value != -math.inf:
            parts.append(f"{'>=' if min_inclusive else '>'} {min_value:g}")
        if max_value != math.inf:
            parts.append(f"<= {max_value:g}")
        rng = " " + " and ".join(parts) if parts else ""
        raise ValueError(f"{name} must be a finite number{rng}, got {value!r}")
    return v


def check_fraction(value: object, name: str) -> float:
    """A number in ``[0, 1]``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1], got {_type_name(value)} {value!r}")
    if not math.isfinite(value) or value < 0.0 or value > 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return float(value)


def check_fractions(top: object, keep: object) -> None:
    """DGP's two fractions of one tensor: each in ``[0, 1]`` and ``top + keep <= 1``
    (with :data:`FRACTION_SUM_TOL`)."""
    check_fraction(top, "top")
    check_fraction(keep, "keep")
    if top + keep > 1.0 + FRACTION_SUM_TOL:  # type: ignore[operator]
        raise ValueError(
            f"top + keep must be <= 1 (they are fractions of the same tensor), "
            f"got top={top!r} + keep={keep!r} = {top + keep!r}"  # type: ignore[operator]
        )


def check_choice(value: S, name: str, choices: Sequence[S]) -> S:
    """One of ``choices`` (compared with ``==``)."""
    try:
        ok = value in choices
    except TypeError:  # unhashable value against a set/dict
        ok = False
    if not ok:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")
    return value


def check_seed(value: object, name: str = "seed") -> Optional[int]:
    """``None`` (unseeded) or an int in ``[0, 2**63 - 1]`` (what ``torch.Generator`` takes)."""
    if value is None:
        return None
    return check_int(value, name, min_value=0, max_value=2**63 - 1)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).replace("torch.", "")


def check_dtype(value: object, name: str, allowed: Mapping[str, torch.dtype]) -> torch.dtype:
    """A ``torch.dtype`` among ``allowed.values()``, or its name (``"bfloat16"`` or
    ``"torch.bfloat16"``); returns the dtype."""
    if isinstance(value, torch.dtype):
        if value in allowed.values():
            return value
        raise ValueError(f"{name} must be one of {sorted(allowed)}, got {value}")
    if isinstance(value, str):
        key = value[len("torch."):] if value.startswith("torch.") else value
        if key in allowed:
            return allowed[key]
        raise ValueError(f"{name} must be one of {sorted(allowed)}, got {value!r}")
    raise TypeError(f"{name} must be a torch.dtype or one of {sorted(allowed)}, "
                    f"got {_type_name(value)} {value!r}")
