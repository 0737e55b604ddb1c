"""Wire format v1: encode one client's :class:`SparsePayload` to bytes, decode it back, and
decode-and-accumulate many clients into dense float32 buffers on the server.

Ops (schemas defined here, once; ``csrc/cpu/codec.cpp`` implements them for CPU)::

    dgp::wire_encode(Tensor?[] indices, Tensor[] values, int[] numels, int[] codings,
                     bool aligned, Tensor meta) -> Tensor                       # uint8 bytes
    dgp::wire_decode(Tensor data, int[]? expected_numels, bool allow_nonfinite)
                     -> (Tensor header, Tensor table, Tensor indices, Tensor values)
    dgp::wire_validate(Tensor data, int[]? expected_numels, int[]? aligned_ks,
                       bool allow_nonfinite) -> ()
    dgp::wire_accumulate(Tensor[] payloads, float[]? weights, Tensor(a!)[] out,
                         Tensor[] aligned_indices, bool allow_nonfinite,
                         bool all_or_nothing) -> Tensor                         # int64 status

The public functions (:func:`encode`, :func:`decode`, :func:`decode_accumulate`) take a
``backend=`` argument: ``None`` (the C++ kernels when ``dgp_kernels._C`` is built, else the
pure-Python fallback in ``_wire_py.py``), ``"cpp"`` or ``"python"``. Both produce identical
bytes and identical results; the tests force each. The byte layout is in README.md.
"""

from __future__ import annotations

import math
import operator
import os
import struct
import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..checks import VALUE_DTYPES
from . import _wire_py as _py
from .payload import LayerPayload, PayloadError, SparsePayload

__all__ = [
    "CODING_NAMES",
    "AccumulateReport",
    "RejectedPayload",
    "accumulate_on_device",
    "cpp_available",
    "decode",
    "decode_accumulate",
    "encode",
    "encode_on_device",
]

CODING_NAMES = _py.CODING_NAMES  # ("implicit", "bitmap", "varint", "rice", "raw32", "raw64")

BytesLike = Union[bytes, bytearray, memoryview, Tensor]

# --------------------------------------------------------------------------------------
# Schemas (a FRAGMENT of the dgp library that ops/select.py defines).
# --------------------------------------------------------------------------------------
_lib = torch.library.Library("dgp", "FRAGMENT")
_lib.define(
    "wire_encode(Tensor?[] indices, Tensor[] values, int[] numels, int[] codings, "
    "bool aligned, Tensor meta) -> Tensor"
)
_lib.define(
    "wire_decode(Tensor data, int[]? expected_numels, bool allow_nonfinite) "
    "-> (Tensor header, Tensor table, Tensor indices, Tensor values)"
)
_lib.define(
    "wire_validate(Tensor data, int[]? expected_numels, int[]? aligned_ks, "
    "bool allow_nonfinite) -> ()"
)
_lib.define(
    "wire_accumulate(Tensor[] payloads, float[]? weights, Tensor(a!)[] out, "
    "Tensor[] aligned_indices, bool allow_nonfinite, bool all_or_nothing) -> Tensor"
)

_OPS = ("wire_encode", "wire_decode", "wire_validate", "wire_accumulate")


def _has_cpp() -> bool:
    from .. import native

    if native.load() is None:  # the loader warns once, naming the cause and the fix
        return False
    return all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"dgp::{op}", "CPU") for op in _OPS
    )


_CPP = _has_cpp()


def cpp_available() -> bool:
    """True when the C++ codec kernels (dgp_kernels._C) serve the ``dgp::wire_*`` ops."""
    return _CPP


# --------------------------------------------------------------------------------------
# Fake kernels: output sizes depend on the data, so they are unbacked sizes.
# --------------------------------------------------------------------------------------
@torch.library.register_fake("dgp::wire_encode")
def _encode_fake(indices, values, numels, codings, aligned, meta):
    n = torch.library.get_ctx().new_dynamic_size()
    return meta.new_empty((n,), dtype=torch.uint8)


@torch.library.register_fake("dgp::wire_decode")
def _decode_fake(data, expected_numels, allow_nonfinite):
    ctx = torch.library.get_ctx()
    L = len(expected_numels) if expected_numels is not None else ctx.new_dynamic_size()
    header = data.new_empty((4,), dtype=torch.int64)
    table = data.new_empty((L, 7), dtype=torch.int64)
    idx = data.new_empty((ctx.new_dynamic_size(),), dtype=torch.int64)
    vals = data.new_empty((ctx.new_dynamic_size(),), dtype=torch.uint8)
    return header, table, idx, vals


@torch.library.register_fake("dgp::wire_validate")
def _validate_fake(data, expected_numels, aligned_ks, allow_nonfinite):
    return None


@torch.library.register_fake("dgp::wire_accumulate")
def _accumulate_fake(payloads, weights, out, aligned_indices, allow_nonfinite, all_or_nothing):
    return torch.empty((len(payloads),), dtype=torch.int64)


# --------------------------------------------------------------------------------------
# The pure-Python fallback behind the op schemas (registered only when C++ is absent).
# --------------------------------------------------------------------------------------
def _mv(t: Tensor) -> memoryview:
    return memoryview(t.contiguous().numpy()) if t.numel() else memoryview(b"")


def _np_idx(t: Optional[Tensor]):
    return None if t is None else t.contiguous().numpy()


def _value_stream(v: Tensor) -> bytes:
    return v.contiguous().view(torch.uint8).numpy().tobytes() if v.numel() else b""


def _py_wire_encode(indices, values, numels, codings, aligned, meta):
    data = _py.encode(
        [_np_idx(i) for i in indices],
        [_value_stream(v) for v in values],
        [_wire_dtype_id(v.dtype, f"values[{i}]") for i, v in enumerate(values)],
        [int(v.numel()) for v in values],
        [int(n) for n in numels],
        [int(c) for c in codings],
        bool(aligned),
        bytes(_mv(meta)),
    )
    return _bytes_tensor(data)


def _py_wire_decode(data, expected_numels, allow_nonfinite):
    d = _mv(data)
    P, idxs = _py.decode(d, expected_numels, allow_nonfinite)
    return _py_decode_tensors(d, P, idxs)


def _py_decode_tensors(d, P, idxs):
    header = torch.tensor([P.flags, P.num_meta, P.meta_off, P.meta_len], dtype=torch.int64)
    rows, chunks, total_k = [], [], 0
    vbegin = P.layers[0].value_off if P.layers else 0
    for e, ix in zip(P.layers, idxs):
        rows.append([e.numel, e.k, e.coding, e.vdtype, e.param, -1 if ix is None else total_k,
                     e.value_off - vbegin])
        if ix is not None:
            chunks.append(torch.from_numpy(ix))
            total_k += e.k
    table = torch.tensor(rows, dtype=torch.int64).reshape(len(rows), 7)
    idx = torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.int64)
    vend = P.layers[-1].value_off + P.layers[-1].k * _py.VALUE_SIZE[P.layers[-1].vdtype] if P.layers else 0
    vals = _bytes_tensor(bytes(d[vbegin:vend]))
    return header, table, idx, vals


def _py_wire_validate(data, expected_numels, aligned_ks, allow_nonfinite):
    _py.validate(_mv(data), expected_numels, aligned_ks, allow_nonfinite)


def _py_wire_accumulate(payloads, weights, out, aligned_indices, allow_nonfinite, all_or_nothing):
    st = _py.accumulate([_mv(p) for p in payloads], weights, out, aligned_indices,
                        allow_nonfinite, all_or_nothing)
    return torch.tensor(st, dtype=torch.int64)


if not _CPP:
    for _name, _fn in (("wire_encode", _py_wire_encode), ("wire_decode", _py_wire_decode),
                       ("wire_validate", _py_wire_validate),
                       ("wire_accumulate", _py_wire_accumulate)):
        _lib.impl(_name, _fn, "CPU")


# --------------------------------------------------------------------------------------
# Helpers shared by the wrappers.
# --------------------------------------------------------------------------------------
def _bytes_tensor(data) -> Tensor:
    if len(data) == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _as_byte_tensor(data: BytesLike, name: str) -> Tensor:
    """A uint8 CPU tensor viewing ``data`` (no copy for bytes/bytearray/memoryview)."""
    if isinstance(data, Tensor):
        if data.dtype != torch.uint8 or data.dim() != 1:
            raise TypeError(f"{name} must be bytes or a 1-D uint8 tensor, got {data.dtype} {tuple(data.shape)}")
        return data.cpu().contiguous()
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"{name} must be bytes, bytearray, memoryview or a uint8 tensor, got {type(data).__name__}")
    if len(data) == 0:
        return torch.empty(0, dtype=torch.uint8)
    with warnings.catch_warnings():  # read-only buffers: the kernels never write to them
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(data, dtype=torch.uint8)


def _as_memory(data: BytesLike, name: str) -> memoryview:
    if isinstance(data, Tensor):
        return _mv(_as_byte_tensor(data, name))
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"{name} must be bytes, bytearray, memoryview or a uint8 tensor, got {type(data).__name__}")
    return memoryview(data).cast("B") if isinstance(data, memoryview) else memoryview(data)


def _wire_dtype_id(dtype: torch.dtype, name: str) -> int:
    try:
        return _py.DTYPE_IDS[dtype]
    except KeyError:
        raise TypeError(f"{name} has dtype {dtype}; the wire carries float32, bfloat16 or float16 values") from None


def _resolve_backend(backend: Optional[str], on_device: bool = False) -> str:
    """``None`` -> ``"triton"`` for tensors on a GPU, else ``"cpp"`` when built, else
    ``"python"``. ``"triton"`` may be forced on CPU tensors (Triton's interpreter, tests)."""
    if backend is None:
        if on_device:
            return "triton"
        return "cpp" if _CPP else "python"
    if backend not in ("cpp", "python", "triton"):
        raise ValueError(f"backend must be None, 'cpp', 'python' or 'triton', got {backend!r}")
    if backend == "cpp" and not _CPP:
        raise RuntimeError(
            "backend='cpp' but the C++ codec kernels are not built; build dgp_kernels._C with "
            "`pip install --no-build-isolation -e .`"
        )
    return backend


def _triton_codec():
    """The device codec modules (imported on first use: triton is optional)."""
    try:
        from ..kernels.triton import codec_decode, codec_encode
    except ImportError as exc:
        raise RuntimeError(f"backend='triton' needs the triton package (pip install 'dgp_kernels[triton]'): {exc}") from None
    return codec_encode, codec_decode


def _check_triton_device(device: torch.device, name: str) -> None:
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"backend='triton' with {name} on the CPU runs only in Triton's interpreter: set "
            "TRITON_INTERPRET=1 before triton is first imported (the tests do)"
        )


def _on_device(t) -> bool:
    return isinstance(t, Tensor) and t.device.type not in ("cpu", "meta")


def _reraise(exc: Exception) -> None:
    """Turn the C++ kernels' "PayloadError: ..." ValueError into PayloadError."""
    msg = str(exc)
    if isinstance(exc, PayloadError):
        raise exc
    if isinstance(exc, ValueError) and msg.startswith("PayloadError: "):
        raise PayloadError(msg[len("PayloadError: "):].split("\nException raised from")[0]) from None
    raise exc


def _coding_id(c, layer: int) -> int:
    if c is None:
        return -1
    if isinstance(c, str):
        if c not in CODING_NAMES:
            raise ValueError(f"force_coding for layer {layer} must be one of {CODING_NAMES} or None, got {c!r}")
        return CODING_NAMES.index(c)
    if isinstance(c, int) and not isinstance(c, bool) and 0 <= c < len(CODING_NAMES):
        return c
    raise ValueError(f"force_coding for layer {layer} must be one of {CODING_NAMES} or None, got {c!r}")


def _as_int(x) -> Optional[int]:
    """int(x) for Python/numpy/torch integers (not bools), else None."""
    if isinstance(x, bool):
        return None
    try:
        return operator.index(x)
    except TypeError:
        return None


def _serialize_meta(meta) -> bytes:
    out = bytearray()
    for i, item in enumerate(meta):
        if not (isinstance(item, tuple) and len(item) == 2):
            raise PayloadError(f"meta[{i}] must be a (str, int) pair, got {item!r}")
        key, val = item
        if not isinstance(key, str) or not (1 <= len(key) <= 255) or not all(0x21 <= ord(ch) <= 0x7E for ch in key):
            raise PayloadError(f"meta[{i}] key must be 1..255 printable ASCII characters without spaces, got {key!r}")
        val = _as_int(val)
        if val is None or not (-(1 << 63) <= val < (1 << 63)):
            raise PayloadError(f"meta[{i}] ({key!r}) value must be an int64, got {item[1]!r}")
        out += bytes([len(key)]) + key.encode("ascii") + int(val).to_bytes(8, "little", signed=True)
    return bytes(out)


# --------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------
def encode(
    payload: SparsePayload,
    value_dtype: Union[None, str, torch.dtype] = None,
    *,
    force_coding=None,
    backend: Optional[str] = None,
) -> bytes:
    """Encode one client's upload to the self-describing wire format v1 (README.md).

    Args:
        payload: the layers in model order. Each layer's ``indices`` (int64 ``[k]``, strictly
            increasing, in ``[0, numel)``; any integer dtype or device is accepted and
            copied to int64 CPU) or ``None`` (positions implicit: ``k == numel``, or an
            ``aligned`` payload); ``values`` ``[k]``.
        value_dtype: ``None`` keeps each layer's values (float32 exact; bfloat16/float16 as
            given; float64 is rounded to float32). ``"float32"``, ``"bfloat16"`` or
            ``"float16"`` (or the torch dtype) converts every layer with round-to-nearest-even:
            bfloat16/float16 are **lossy** (8 / 11 significant bits; float16 overflows to inf
            above 65504).
        force_coding: ``None`` (each layer gets the smallest exact index coding), one coding
            name for every layer, or a per-layer sequence of names/``None``; names are
            ``"implicit" "bitmap" "varint" "rice" "raw32" "raw64"``. For tests and studies.
        backend: ``None`` (``"triton"`` when the values are on a GPU, else ``"cpp"`` when
            built, else ``"python"``), ``"cpp"``, ``"python"`` (identical bytes; tensors
            are copied to the host) or ``"triton"`` (the device encoder: implicit, bitmap,
            raw32 and raw64 only; forced on CPU tensors it needs ``TRITON_INTERPRET=1``).
            Unforced, the device encoder picks the smallest of the codings it writes (ties
            to the lowest id): its bytes equal the CPU encoder's given the same codings.

    Returns:
        the payload bytes (``"triton"``: a 1-D uint8 tensor on the values' device, after
        one host sync that checks the indices). Raises :class:`PayloadError` for invalid layer contents (indices
        unsorted, repeated or out of range, ``k > numel``, bad meta), ``TypeError`` for
        unsupported dtypes and ``ValueError`` for an impossible ``force_coding``.
    """
    if not isinstance(payload, SparsePayload):
        raise TypeError(f"payload must be a SparsePayload, got {type(payload).__name__}")
    be = _resolve_backend(backend, any(_on_device(getattr(l, "values", None)) for l in payload.layers))
    if value_dtype is not None:
        if isinstance(value_dtype, str):
            if value_dtype not in VALUE_DTYPES:
                raise ValueError(f"value_dtype must be None or one of {tuple(VALUE_DTYPES)}, got {value_dtype!r}")
            value_dtype = VALUE_DTYPES[value_dtype]
        elif value_dtype not in VALUE_DTYPES.values():
            raise ValueError(f"value_dtype must be None or one of {tuple(VALUE_DTYPES)}, got {value_dtype!r}")
    L = len(payload.layers)
    if force_coding is None or isinstance(force_coding, (str, int)):
        codings = [_coding_id(force_coding, i) for i in range(L)]
    else:
        fc = list(force_coding)
        if len(fc) != L:
            raise ValueError(f"force_coding has {len(fc)} entries for {L} layers")
        codings = [_coding_id(c, i) for i, c in enumerate(fc)]
    if be == "triton":
        data, bad = encode_on_device(payload, value_dtype, codings)
        if bool(bad.any()):  # the one host sync of a device encode
            _host_plan_error(payload, value_dtype, codings, int(bad.nonzero()[0, 0]))
        return data
    indices: List[Optional[Tensor]] = []
    values: List[Tensor] = []
    numels: List[int] = []
    for i, layer in enumerate(payload.layers):
        v = _layer_values(layer, i)
        v = v.detach().reshape(-1).cpu()
        if value_dtype is not None:
            v = v.to(value_dtype)
        elif v.dtype == torch.float64:
            v = v.to(torch.float32)
        _wire_dtype_id(v.dtype, f"payload.layers[{i}].values")
        ix = layer.indices
        if ix is not None:
            if not isinstance(ix, Tensor) or ix.dtype.is_floating_point or ix.dtype.is_complex or ix.dtype == torch.bool:
                raise TypeError(f"payload.layers[{i}].indices must be an integer tensor or None")
            ix = ix.detach().reshape(-1).cpu().to(torch.int64).contiguous()
            if ix.numel() != v.numel():
                raise PayloadError(
                    f"layer {i}: {ix.numel()} indices but {v.numel()} values")
        n = _layer_numel(layer, i)
        indices.append(ix)
        values.append(v.contiguous())
        numels.append(int(n))
    meta = _serialize_meta(payload.meta)
    aligned = bool(payload.aligned)
    try:
        if be == "cpp":
            out = torch.ops.dgp.wire_encode(indices, values, numels, codings, aligned, _bytes_tensor(meta))
            return out.numpy().tobytes()
        return _py.encode(
            [_np_idx(i) for i in indices], [_value_stream(v) for v in values],
            [_py.DTYPE_IDS[v.dtype] for v in values], [int(v.numel()) for v in values],
            numels, codings, aligned, meta,
        )
    except (ValueError, RuntimeError) as exc:
        _reraise(exc)


def _layer_numel(layer: "LayerPayload", i: int) -> int:
    """``layer.numel`` as a non-negative int, or a PayloadError naming the layer."""
    n = _as_int(layer.numel)
    if n is None or n < 0:
        raise PayloadError(f"layer {i}: numel must be a non-negative int, got {layer.numel!r}")
    return n


def _layer_values(layer: object, i: int) -> Tensor:
    """``layer.values`` of ``payload.layers[i]``, or a TypeError naming it."""
    if not isinstance(layer, LayerPayload):
        raise TypeError(f"payload.layers[{i}] must be a LayerPayload, got {type(layer).__name__}")
    if not isinstance(layer.values, Tensor):
        raise TypeError(f"payload.layers[{i}].values must be a tensor, got "
                        f"{type(layer.values).__name__}")
    return layer.values


def _device_layers(payload: SparsePayload, value_dtype, device=None):
    """(indices, values in the wire dtype, numels, dtype ids, device) for the device
    encoder; tensors stay on (or move to) one device. Shape-level checks only."""
    idxs, vals, numels, vds = [], [], [], []
    for i, layer in enumerate(payload.layers):
        v = _layer_values(layer, i)
        if device is None:
            device = v.device
        v = v.detach().reshape(-1).to(device)
        if value_dtype is not None:
            v = v.to(value_dtype)
        elif v.dtype == torch.float64:
            v = v.to(torch.float32)
        vds.append(_wire_dtype_id(v.dtype, f"payload.layers[{i}].values"))
        ix = layer.indices
        if ix is not None:
            if not isinstance(ix, Tensor) or ix.dtype.is_floating_point or ix.dtype.is_complex or ix.dtype == torch.bool:
                raise TypeError(f"payload.layers[{i}].indices must be an integer tensor or None")
            ix = ix.detach().reshape(-1).to(device=device, dtype=torch.int64)
            if ix.numel() != v.numel():
                raise PayloadError(f"layer {i}: {ix.numel()} indices but {v.numel()} values")
        n = _layer_numel(layer, i)
        idxs.append(ix)
        vals.append(v.contiguous())
        numels.append(int(n))
    return idxs, vals, numels, vds, device if device is not None else torch.device("cpu")


def _host_plan_error(payload: SparsePayload, value_dtype, codings: Sequence[int], upto: int) -> None:
    """Raise what the CPU encoder raises for layers ``0..upto`` (host copies; error path)."""
    idxs, vals, numels, vds, _ = _device_layers(payload, value_dtype, torch.device("cpu"))
    aligned = bool(payload.aligned)
    for j in range(min(upto + 1, len(numels))):
        _py.plan_layer(numels[j], int(vals[j].numel()), _np_idx(idxs[j]), vds[j], codings[j], aligned, j)
    raise RuntimeError(f"device encoder flagged layer {upto}, which the CPU encoder accepts")  # not reached


def encode_on_device(payload: SparsePayload, value_dtype=None, codings: Optional[Sequence[int]] = None
                     ) -> Tuple[Tensor, Tensor]:
    """The device encoder without its host sync: ``(bytes, bad)``, both on the values'
    device. ``bytes``: the wire-format v1 payload (uint8); ``bad``: int32 ``[L]``, nonzero
    where a layer's indices are not strictly increasing in ``[0, numel)`` (then ``bytes``
    is not a valid payload; read it whenever convenient, e.g. with other flags of a step).
    ``codings``: coding ids per layer (-1: the smallest device coding). ``value_dtype`` a
    torch dtype or None. Shape-level errors (``k > numel``, an impossible forced coding)
    raise at once, as in :func:`encode`. Launches: see ``kernels/triton/codec_encode.py``.
    """
    enc, _ = _triton_codec()
    L = len(payload.layers)
    codings = [-1] * L if codings is None else list(codings)
    idxs, vals, numels, vds, device = _device_layers(payload, value_dtype)
    _check_triton_device(device, "the payload")
    aligned = bool(payload.aligned)
    chosen = []
    for i in range(L):
        n, k, f, ix = numels[i], int(vals[i].numel()), codings[i], idxs[i]
        if f in (_py.VARINT, _py.RICE):
            raise ValueError(f"force_coding for layer {i}: the triton codec writes implicit, bitmap, raw32 "
                             f"or raw64, not {CODING_NAMES[f]!r}")
        if ix is not None and ix.device != device:
            raise ValueError(f"payload.layers[{i}].indices is on {ix.device}, the values on {device}")
        bad = n > _py.MAX_NUMEL or k > n or (ix is not None and aligned)
        bad = bad or (ix is None and not aligned and k != n)
        if ix is None or aligned:
            bad = bad or f not in (-1, _py.IMPLICIT)
            c = _py.IMPLICIT
        elif f == -1 or (f == _py.IMPLICIT and k == n):
            c = enc.choose_coding(n, k, True, False)
        else:
            bad = bad or f == _py.IMPLICIT or (f == _py.RAW32 and n > _py.RAW32_MAX_NUMEL)
            c = f
        if bad:
            _host_plan_error(payload, value_dtype, codings, i)
        chosen.append(c)
    meta = _serialize_meta(payload.meta)
    return enc.encode_device(idxs, vals, numels, vds, chosen, aligned, meta, len(payload.meta))


def _meta_pairs(d: memoryview, off: int, length: int, count: int) -> Tuple[Tuple[str, int], ...]:
    return tuple(_py.parse_meta(d[off: off + length], off, count)[1])


def decode(
    data: BytesLike,
    expected_numels: Optional[Sequence[int]] = None,
    *,
    allow_nonfinite: bool = False,
    backend: Optional[str] = None,
) -> SparsePayload:
    """Decode and fully validate one payload.

    Args:
        data: the bytes (bytes-like or a 1-D uint8 tensor).
        expected_numels: the server's model, one numel per layer; a payload with another
            layer count or another numel for any layer is rejected.
        allow_nonfinite: accept NaN/inf values (rejected by default: one client's NaN would
            poison the aggregate).
        backend: ``None`` (``"triton"`` for a uint8 tensor on a GPU), ``"cpp"``,
            ``"python"`` or ``"triton"`` (validated on the device, tensors returned there;
            three small device-to-host reads: header, meta + layer table, status).

    Returns:
        a :class:`SparsePayload` (on the payload's device for ``"triton"``): indices int64 (``None`` for implicit positions: dense
        layers and aligned payloads), values in the wire dtype (float32 / bfloat16 /
        float16). float32 round trips are exact.

    Raises:
        PayloadError: for any malformed, truncated, corrupted or mismatched payload, with
        what and where (layer, byte offset).
    """
    be = _resolve_backend(backend, _on_device(data))
    exp = _check_numels(expected_numels, "expected_numels")
    if be == "triton":
        return _decode_triton(data, exp, bool(allow_nonfinite))
    try:
        if be == "cpp":
            t = _as_byte_tensor(data, "data")
            header, table, idx, vals = torch.ops.dgp.wire_decode(t, exp, bool(allow_nonfinite))
            d = _mv(t)
        else:
            d = _as_memory(data, "data")
            P, idxs = _py.decode(d, exp, bool(allow_nonfinite))
            header, table, idx, vals = _py_decode_tensors(d, P, idxs)
    except (ValueError, RuntimeError) as exc:
        _reraise(exc)
    flags, num_meta, meta_off, meta_len = header.tolist()
    meta = _meta_pairs(d, meta_off, meta_len, num_meta)
    layers = []
    for numel, k, coding, vdtype, _param, ioff, voff in table.tolist():
        ix = None if ioff < 0 else idx[ioff: ioff + k]
        size = _py.VALUE_SIZE[vdtype]
        chunk = vals[voff: voff + k * size]
        if voff % size:
            chunk = chunk.clone()  # dtype views need aligned storage offsets
        layers.append(LayerPayload(numel=numel, indices=ix, values=chunk.view(_py.ID_DTYPES[vdtype])))
    return SparsePayload(layers=tuple(layers), aligned=bool(flags & _py.FLAG_ALIGNED), meta=meta)


def _check_numels(numels, name) -> Optional[List[int]]:
    if numels is None:
        return None
    out = []
    for i, n in enumerate(numels):
        v = _as_int(n)
        if v is None or v < 0:
            raise ValueError(f"{name}[{i}] must be a non-negative int, got {n!r}")
        out.append(v)
    return out


@dataclass(frozen=True)
class RejectedPayload:
    """A client whose payload contributed nothing, and why (the PayloadError message)."""

    client: int
    reason: str


@dataclass(frozen=True)
class AccumulateReport:
    """What :func:`decode_accumulate` did.

    Attributes:
        accepted: indices of the clients that were added, in the order they were added.
        rejected: the clients that were skipped, each with the reason.
        weight_sum: sum of the accepted clients' weights (their count when unweighted), the
            normaliser a FedAvg server divides by.
    """

    accepted: Tuple[int, ...]
    rejected: Tuple[RejectedPayload, ...]
    weight_sum: float

    @property
    def num_accepted(self) -> int:
        return len(self.accepted)

    @property
    def all_accepted(self) -> bool:
        return not self.rejected


def decode_accumulate(
    payloads: Sequence[BytesLike],
    out: Union[Tensor, Sequence[Tensor]],
    weights: Optional[Sequence[float]] = None,
    *,
    numels: Optional[Sequence[int]] = None,
    indices: Optional[Sequence[Tensor]] = None,
    strict: bool = False,
    allow_nonfinite: bool = False,
    backend: Optional[str] = None,
) -> AccumulateReport:
    """Sum many clients' payloads into dense float32 buffers (server-side aggregation).

    For each element ``x`` of layer ``l``, in client order ``c = 0, 1, ...``:
    ``out[l][x] = out[l][x] + v_c`` (unweighted) or ``out[l][x] + float32(w_c) * v_c``
    (weighted), one float32 rounding per operation and no fused multiply-add, so the result
    is deterministic and identical on both backends and for any thread count.

    Args:
        payloads: the clients' bytes (bytes-like or uint8 tensors), in a fixed order.
        out: float32 contiguous buffers, one per layer (mutated in place; their numels
            are the model the payloads must match), or one flat float32 buffer with
            ``numels=`` giving the layer sizes. All on the CPU, or all on one GPU: then
            the payloads are validated and decoded on the CPU (where the bytes arrive) and
            each accepted client is added on the GPU with one ``index_add_`` over all
            layers, in client order, with the same float32 arithmetic (bit-identical to
            the CPU result).
        weights: optional per-client weights (finite floats), e.g. FedAvg sample counts.
        indices: for aligned (ADGP) payloads, the broadcast positions of each layer (int64,
            strictly increasing); an aligned payload's values are added at those positions.
        strict: raise :class:`PayloadError` (naming the client) if any payload is rejected,
            leaving ``out`` untouched; by default rejected clients are skipped and reported.
        allow_nonfinite: accept NaN/inf values (rejected by default).

    Every payload is validated completely before anything is added, so a rejected client
    contributes nothing and ``out`` is never half-updated.
    """
    if isinstance(payloads, (bytes, bytearray, memoryview, Tensor)):
        raise TypeError("payloads must be a sequence of payloads (one per client), not a single payload")
    payloads = list(payloads)
    first_out = out if isinstance(out, Tensor) else next(iter(out), None) if isinstance(out, (list, tuple)) else None
    be = _resolve_backend(backend, _on_device(first_out) and all(_on_device(p) for p in payloads))
    if isinstance(out, Tensor):
        ns = _check_numels(numels, "numels")
        if ns is None:
            raise ValueError("a flat out buffer needs numels= (the layer sizes)")
        if out.dim() != 1 or sum(ns) != out.numel():
            raise ValueError(f"flat out has {out.numel()} entries but numels sum to {sum(ns)}")
        _check_out(out, "out")
        outs = list(out.split(ns))
    else:
        if numels is not None:
            raise ValueError("numels= is only for a flat out buffer")
        outs = list(out)
        for i, o in enumerate(outs):
            _check_out(o, f"out[{i}]")
    devices = {o.device for o in outs}
    if len(devices) > 1:
        raise ValueError(f"out buffers must all be on one device, got {sorted(map(str, devices))}")
    if weights is not None:
        weights = [float(w) for w in weights]
        if len(weights) != len(payloads):
            raise ValueError(f"weights has {len(weights)} entries for {len(payloads)} payloads")
        for i, w in enumerate(weights):
            if not math.isfinite(w):
                raise ValueError(f"weights[{i}] must be finite, got {w!r}")
    aligned_idx: List[Tensor] = []
    if indices is not None:
        indices = list(indices)
        if len(indices) != len(outs):
            raise ValueError(f"indices has {len(indices)} tensors for {len(outs)} layers")
        if be == "triton":
            aligned_idx = _check_positions_device(indices, outs)
        else:
            aligned_idx = [_check_positions(p, o.numel(), i) for i, (p, o) in enumerate(zip(indices, outs))]
    if be == "triton":
        return _accumulate_triton(payloads, weights, out, outs, aligned_idx if indices is not None else None,
                                  bool(allow_nonfinite), bool(strict))
    try:
        if outs and outs[0].device.type != "cpu":
            status = _accumulate_staged(payloads, weights, outs, aligned_idx, bool(allow_nonfinite),
                                        bool(strict), be)
        elif be == "cpp":
            ts = [_as_byte_tensor(p, f"payloads[{c}]") for c, p in enumerate(payloads)]
            status = torch.ops.dgp.wire_accumulate(ts, weights, outs, aligned_idx, bool(allow_nonfinite),
                                                   bool(strict)).tolist()
        else:
            ts = [_as_memory(p, f"payloads[{c}]") for c, p in enumerate(payloads)]
            status = _py.accumulate(ts, weights, outs, aligned_idx, bool(allow_nonfinite), bool(strict))
    except (ValueError, RuntimeError) as exc:
        _reraise(exc)
    numels_l = [int(o.numel()) for o in outs]
    aks = [int(a.numel()) for a in aligned_idx] if aligned_idx else None
    rejected = []
    for c, st in enumerate(status):
        if st:
            rejected.append(RejectedPayload(c, _why(payloads[c], numels_l, aks, allow_nonfinite)))
    if strict and rejected:
        first = rejected[0]
        raise PayloadError(f"client {first.client}: {first.reason}"
                           + (f" (and {len(rejected) - 1} more rejected)" if len(rejected) > 1 else ""))
    accepted = tuple(c for c, st in enumerate(status) if not st)
    wsum = float(len(accepted)) if weights is None else math.fsum(weights[c] for c in accepted)
    return AccumulateReport(accepted=accepted, rejected=tuple(rejected), weight_sum=wsum)


def _accumulate_staged(payloads, weights, outs: List[Tensor], aligned_idx: List[Tensor],
                       allow_nonfinite: bool, all_or_nothing: bool, be: str) -> List[int]:
    """``decode_accumulate`` for buffers on a GPU (any device; the tests also run it on CPU
    buffers against the C++ kernel): validate and decode every payload on the CPU, then add
    each accepted client with one ``index_add_`` over a flat copy of all layers (global
    positions), clients in order. Within one client every position occurs once, so each
    element receives ``out + v`` (or ``out + float32(w) * v``: the product is its own
    float32 op) with one rounding per client, as on the CPU. Returns the status list
    (0 accepted, 1 rejected); nothing is written when ``all_or_nothing`` and one fails."""
    numels = [int(o.numel()) for o in outs]
    aks = [int(a.numel()) for a in aligned_idx] if aligned_idx else None
    status, decoded = [], []
    for p in payloads:
        try:
            sp = decode(p, numels, allow_nonfinite=allow_nonfinite, backend=be)
            if sp.aligned:
                if aks is None:
                    raise PayloadError("aligned payload, but the server passed no aligned positions "
                                       "(indices=) to place its values")
                for i, layer in enumerate(sp.layers):
                    if layer.values.numel() != aks[i]:
                        raise PayloadError(f"layer {i}: aligned payload has k = {layer.values.numel()} "
                                           f"values but the broadcast positions number {aks[i]}")
            decoded.append(sp)
            status.append(0)
        except PayloadError:
            decoded.append(None)
            status.append(1)
    if (all_or_nothing and any(status)) or not outs or all(status):
        return status
    device = outs[0].device
    starts = [0]
    for n in numels:
        starts.append(starts[-1] + n)
    flat = torch.cat([o.reshape(-1) for o in outs]) if len(outs) > 1 else outs[0].view(-1)
    for c, sp in enumerate(decoded):
        if sp is None:
            continue
        pos, vals = [], []
        for i, layer in enumerate(sp.layers):
            k = layer.values.numel()
            if k == 0:
                continue
            if layer.indices is not None:
                x = layer.indices
            elif sp.aligned:
                x = aligned_idx[i]
            else:
                x = torch.arange(k, dtype=torch.int64)  # dense layer: every position
            pos.append(x + starts[i])
            vals.append(layer.values.float())  # exact widening of bfloat16 / float16
        if not pos:
            continue
        pos_d = torch.cat(pos).to(device, non_blocking=True)
        v = torch.cat(vals).to(device, non_blocking=True)
        if weights is not None:
            v = v * torch.tensor(weights[c], dtype=torch.float32, device=device)
        flat.index_add_(0, pos_d, v)
    if len(outs) > 1:
        for o, a, b in zip(outs, starts[:-1], starts[1:]):
            o.view(-1).copy_(flat[a:b])
    return status


def _why(payload, numels, aks, allow_nonfinite) -> str:
    """The rejection message (re-validates one rejected payload; only on the failure path)."""
    try:
        _py.validate(_as_memory(payload, "payload"), numels, aks, allow_nonfinite)
    except PayloadError as exc:
        return str(exc)
    return "rejected"  # not reached: both backends share one validity predicate


def _check_out(o, name: str) -> None:
    if not isinstance(o, Tensor):
        raise TypeError(f"{name} must be a float32 tensor, got {type(o).__name__}")
    if o.dtype != torch.float32:
        raise TypeError(f"{name} must be float32 (the accumulator is dense float32), got {o.dtype}")
    if not o.is_contiguous():
        raise ValueError(f"{name} must be contiguous (device {o.device})")


def _check_positions(p, numel: int, layer: int) -> Tensor:
    if not isinstance(p, Tensor) or p.dtype.is_floating_point or p.dtype == torch.bool:
        raise TypeError(f"indices[{layer}] must be an integer tensor of broadcast positions")
    p = p.detach().reshape(-1).cpu().to(torch.int64).contiguous()
    if p.numel() and (bool((p[1:] <= p[:-1]).any()) or int(p[0]) < 0 or int(p[-1]) >= numel):
        raise ValueError(f"indices[{layer}] must be strictly increasing in [0, {numel})")
    return p


def _check_positions_device(indices, outs: List[Tensor]) -> List[Tensor]:
    """Broadcast positions on the buffers' device, checked with one host read in all."""
    dev = outs[0].device
    ps, oks = [], []
    for i, (p, o) in enumerate(zip(indices, outs)):
        if not isinstance(p, Tensor) or p.dtype.is_floating_point or p.dtype == torch.bool:
            raise TypeError(f"indices[{i}] must be an integer tensor of broadcast positions")
        p = p.detach().reshape(-1).to(device=dev, dtype=torch.int64)
        if p.numel():
            oks.append(((p[1:] <= p[:-1]).any() | (p[0] < 0) | (p[-1] >= o.numel())).reshape(1))
        else:
            oks.append(torch.zeros(1, dtype=torch.bool, device=dev))
        ps.append(p)
    if oks:
        bad = torch.cat(oks).tolist()
        for i, b in enumerate(bad):
            if b:
                raise ValueError(f"indices[{i}] must be strictly increasing in [0, {outs[i].numel()})")
    return ps


def _pack_payloads(payloads, device: torch.device) -> Tuple[Tensor, Tensor, Tensor, int, List[int]]:
    """One uint8 buffer on ``device`` holding every payload, with int64 starts and lengths."""
    ts = []
    for c, p in enumerate(payloads):
        if isinstance(p, Tensor):
            if p.dtype != torch.uint8 or p.dim() != 1:
                raise TypeError(f"payloads[{c}] must be bytes or a 1-D uint8 tensor, got {p.dtype} {tuple(p.shape)}")
            ts.append(p.to(device))
        else:
            ts.append(_as_byte_tensor(p, f"payloads[{c}]").to(device))
    lens = [int(t.numel()) for t in ts]
    starts = [0]
    for n in lens[:-1]:
        starts.append(starts[-1] + n)
    buf = torch.cat(ts) if ts else torch.empty(0, dtype=torch.uint8, device=device)
    meta = torch.tensor(starts + lens, dtype=torch.int64).to(device) if ts else torch.empty(0, dtype=torch.int64, device=device)
    return buf, meta[: len(ts)], meta[len(ts):], max(lens, default=0), lens


def accumulate_on_device(buf: Tensor, starts: Tensor, lens: Tensor, max_len: int, out: Tensor,
                         numels: Sequence[int], weights: Optional[Tensor] = None,
                         positions: Optional[Tensor] = None, aligned_ks: Optional[Sequence[int]] = None,
                         allow_nonfinite: bool = False, all_or_nothing: bool = False) -> Tensor:
    """The device decode-and-accumulate without any host sync (the DDP hook's entry point).

    ``buf`` uint8 holds the clients' payloads at ``starts[c]`` with lengths ``lens[c]``
    (int64 device tensors, e.g. an all-gathered size vector; every range inside ``buf``,
    ``max(lens) <= max_len``); ``out`` flat float32 (the layers of ``numels`` back to back,
    mutated in place). Returns the int32 ``[C + 1]`` status vector on the device: per
    client 0 accepted (added), 1 rejected, 2 needs the host (varint or Rice streams);
    ``status[C]``: bit 0 some client rejected, bit 1 some client needs the host, bit 2 the
    call added nothing (bit 1, or bit 0 with ``all_or_nothing``). Semantics and arithmetic
    as :func:`decode_accumulate`; launches in ``kernels/triton/codec_decode.py``.
    """
    _, dec = _triton_codec()
    _check_triton_device(buf.device, "the payload buffer")
    return dec.accumulate_device(buf, starts, lens, max_len, list(numels), out, weights, positions,
                                 aligned_ks, allow_nonfinite, all_or_nothing)


def _accumulate_triton(payloads, weights, out, outs: List[Tensor], aligned_idx: Optional[List[Tensor]],
                       allow_nonfinite: bool, strict: bool) -> AccumulateReport:
    """``decode_accumulate`` on the buffers' device: validate and add there, then read the
    ``C + 1`` status words back once. Clients using varint/Rice streams (the device does
    not walk them) send the whole call to the host-validated path, on untouched buffers.
    Rejection messages are the CPU validator's, recomputed from the rejected clients' bytes
    (only when a client is rejected)."""
    device = outs[0].device if outs else torch.device("cpu")
    _check_triton_device(device, "the out buffers")
    numels = [int(o.numel()) for o in outs]
    buf, starts, lens, max_len, _ = _pack_payloads(payloads, device)
    if isinstance(out, Tensor):
        flat, copy_back = out, False
    else:
        flat, copy_back = _flat_view(outs)
    w = torch.tensor(weights, dtype=torch.float32).to(device) if weights is not None else None
    aks = [int(a.numel()) for a in aligned_idx] if aligned_idx is not None else None
    pos = torch.cat(aligned_idx) if aligned_idx else None
    status = accumulate_on_device(buf, starts, lens, max_len, flat, numels, w, pos, aks, allow_nonfinite,
                                  strict).tolist()  # the one device-to-host read
    C = len(payloads)
    if status[C] & 2:  # varint / Rice somewhere: validate and decode on the host instead
        return decode_accumulate([_host_bytes(p) for p in payloads], out, weights,
                                 numels=numels if isinstance(out, Tensor) else None,
                                 indices=aligned_idx, strict=strict, allow_nonfinite=allow_nonfinite,
                                 backend="cpp" if _CPP else "python")
    if copy_back and not status[C] & 4:
        for o, part in zip(outs, flat.split(numels)):
            o.view(-1).copy_(part)
    rejected = [RejectedPayload(c, _why(_host_bytes(payloads[c]), numels, aks, allow_nonfinite))
                for c in range(C) if status[c]]
    if strict and rejected:
        first = rejected[0]
        raise PayloadError(f"client {first.client}: {first.reason}"
                           + (f" (and {len(rejected) - 1} more rejected)" if len(rejected) > 1 else ""))
    accepted = tuple(c for c in range(C) if not status[c])
    wsum = float(len(accepted)) if weights is None else math.fsum(weights[c] for c in accepted)
    return AccumulateReport(accepted=accepted, rejected=tuple(rejected), weight_sum=wsum)


def _flat_view(outs: List[Tensor]) -> Tuple[Tensor, bool]:
    """One flat float32 tensor over the layers: a view when they are back to back in one
    storage, else a copy (``True``: copy the result back)."""
    if not outs:
        return torch.empty(0, dtype=torch.float32), False
    base = outs[0]
    st = base.untyped_storage()
    off = base.storage_offset()
    ok = True
    for o in outs:
        if o.untyped_storage().data_ptr() != st.data_ptr() or o.storage_offset() != off:
            ok = False
            break
        off += o.numel()
    if ok:
        return base.as_strided((sum(o.numel() for o in outs),), (1,)), False
    return torch.cat([o.reshape(-1) for o in outs]), True


def _host_bytes(p) -> bytes:
    if isinstance(p, Tensor):
        return p.detach().cpu().numpy().tobytes()
    return bytes(p)


def _host_table(region: bytes, n: int):
    """Lenient read of header, meta and layer table (sizes for the device decoder's grids):
    ``(flags, meta pairs, [(numel, k, nbytes, coding, vdtype)])`` or None when they do not
    even fit (then the payload is invalid and the host decoder says why)."""
    if len(region) < 16:
        return None
    magic, version, flags, L, num_meta = _py._HEADER.unpack_from(region, 0)
    pos = 16
    for _ in range(num_meta):
        if pos >= len(region):
            return None
        pos += 1 + region[pos] + 8
    if pos + 28 * L > len(region):
        return None
    try:
        _, meta = _py.parse_meta(region[16:pos], 16, num_meta)
    except PayloadError:
        return None
    table = [_py._ENTRY.unpack_from(region, pos + 28 * i)[:5] for i in range(L)]
    return flags, tuple(meta), table


def _decode_triton(data, exp: Optional[List[int]], allow_nonfinite: bool) -> SparsePayload:
    _, dec = _triton_codec()
    t = data if isinstance(data, Tensor) else _as_byte_tensor(data, "data")
    if t.dtype != torch.uint8 or t.dim() != 1:
        raise TypeError(f"data must be bytes or a 1-D uint8 tensor, got {t.dtype} {tuple(t.shape)}")
    device = t.device
    _check_triton_device(device, "data")
    n = int(t.numel())

    def on_host() -> SparsePayload:  # the host decoder: its PayloadError, or its result moved over
        sp = decode(_host_bytes(t), exp, allow_nonfinite=allow_nonfinite, backend="cpp" if _CPP else "python")
        return SparsePayload(tuple(LayerPayload(l.numel, None if l.indices is None else l.indices.to(device),
                                                l.values.to(device)) for l in sp.layers), sp.aligned, sp.meta)

    if n < _py.HEADER_BYTES + _py.CRC_BYTES:
        return on_host()
    L, num_meta = struct.unpack("<II", _host_bytes(t[8:16]))
    if L * _py.LAYER_BYTES > n or num_meta * 10 > n:
        return on_host()
    head = _host_table(_host_bytes(t[: min(n, 16 + 264 * num_meta + _py.LAYER_BYTES * L)]), n)
    if head is None:
        return on_host()
    flags, meta, table = head
    numels = exp if exp is not None else [row[0] for row in table]
    if len(numels) != len(table) or any(x > 8 * n + 8 for x in numels):
        return on_host()  # shapes the payload cannot fill (or a layer-count mismatch): host decoder
    starts = torch.zeros(1, dtype=torch.int64, device=device)
    lens = torch.full((1,), n, dtype=torch.int64, device=device)
    v = dec.validate_device(t, starts, lens, n, numels, None, allow_nonfinite, False, accept_aligned=True)
    st = torch.cat([v.status.long(), v.rec[: 5 * len(numels)]]).tolist()
    if st[0] != 0:
        return on_host()  # rejected (PayloadError with the CPU message) or varint / Rice streams
    rec = [st[2 + 5 * i: 2 + 5 * i + 5] for i in range(len(numels))]
    codings = [r[0] for r in rec]
    ks = [r[1] for r in rec]
    idx = dec.extract_indices(t, starts, lens, v, numels, ks, codings)
    layers = []
    for i, (coding, k, _ioff, voff, vd) in enumerate(rec):
        size = _py.VALUE_SIZE[vd]
        chunk = t[voff: voff + k * size]
        if voff % size:
            chunk = chunk.clone()
        layers.append(LayerPayload(numel=numels[i], indices=idx[i], values=chunk.view(_py.ID_DTYPES[vd])))
    return SparsePayload(layers=tuple(layers), aligned=bool(flags & _py.FLAG_ALIGNED), meta=meta)
