"""The dgp::wire_* ops themselves: opcheck (schema, fake kernels, autograd registration,
AOT dispatch) and the argument checks of the raw ops (they can be called directly, so the
C++ kernels re-check what the Python wrappers check)."""

from __future__ import annotations

import pytest
import torch

from dgp_kernels.codec import LayerPayload, SparsePayload, encode
from dgp_kernels.codec import wire

IDX = torch.tensor([1, 5, 7])
VAL = torch.tensor([0.5, -2.0, 3.0])


def _data() -> torch.Tensor:
    return torch.frombuffer(bytearray(encode(SparsePayload((LayerPayload(10, IDX, VAL),)))), dtype=torch.uint8)


def _cases():
    d = _data()
    return {
        "wire_encode": ([IDX, None], [VAL, torch.randn(4)], [10, 4], [-1, -1], False,
                        torch.empty(0, dtype=torch.uint8)),
        "wire_decode": (d, [10], False),
        "wire_validate": (d, [10], None, False),
        "wire_accumulate": ([d, d], [1.0, 2.0], [torch.zeros(10)], [], False, False),
    }


@pytest.mark.parametrize("name", ["wire_encode", "wire_decode", "wire_validate", "wire_accumulate"])
def test_opcheck(name):
    res = torch.library.opcheck(getattr(torch.ops.dgp, name), _cases()[name])
    assert all(v == "SUCCESS" for v in res.values()), res


def test_raw_op_payload_error_prefix():
    bad = _data().clone()
    bad[-1] ^= 1
    with pytest.raises(ValueError, match="^PayloadError: bad checksum"):
        torch.ops.dgp.wire_decode(bad, None, False)


@pytest.mark.skipif(not wire.cpp_available(), reason="dgp_kernels._C (C++ codec kernels) not built")
def test_raw_op_argument_checks():
    d = _data()
    with pytest.raises(TypeError, match="uint8"):
        torch.ops.dgp.wire_decode(d.to(torch.int32), None, False)
    with pytest.raises(TypeError, match="int64"):
        torch.ops.dgp.wire_encode([IDX.int()], [VAL], [10], [-1], False, torch.empty(0, dtype=torch.uint8))
    with pytest.raises(ValueError, match="one entry per layer"):
        torch.ops.dgp.wire_encode([IDX], [VAL], [10, 3], [-1], False, torch.empty(0, dtype=torch.uint8))
    with pytest.raises(ValueError, match="coding id"):
        torch.ops.dgp.wire_encode([IDX], [VAL], [10], [6], False, torch.empty(0, dtype=torch.uint8))
    with pytest.raises(ValueError, match="PayloadError: meta"):
        torch.ops.dgp.wire_encode([IDX], [VAL], [10], [-1], False, torch.tensor([3, 65], dtype=torch.uint8))
    out = torch.zeros(10)
    with pytest.raises(ValueError, match="aligned_indices\\[0\\] must be strictly increasing"):
        torch.ops.dgp.wire_accumulate([d], None, [out], [torch.tensor([0, 10])], False, False)
    with pytest.raises(ValueError, match="weights"):
        torch.ops.dgp.wire_accumulate([d], [1.0, 2.0], [out], [], False, False)
    with pytest.raises(TypeError, match="float32"):
        torch.ops.dgp.wire_accumulate([d], None, [out.double()], [], False, False)
    assert torch.equal(out, torch.zeros(10))
    st = torch.ops.dgp.wire_accumulate([d, d[:-1]], None, [out], [], False, False)
    assert st.tolist() == [0, 1] and out[IDX].tolist() == VAL.tolist()


@pytest.mark.skipif(not wire.cpp_available(), reason="dgp_kernels._C (C++ codec kernels) not built")
def test_python_op_adapters_match_the_cpp_ops():
    """The Python functions that serve the op schemas when _C is absent give the same outputs."""
    enc_args = _cases()["wire_encode"]
    a = torch.ops.dgp.wire_encode(*enc_args)
    b = wire._py_wire_encode(*enc_args)
    assert torch.equal(a, b)
    for x, y in zip(torch.ops.dgp.wire_decode(a, [10, 4], False), wire._py_wire_decode(a, [10, 4], False)):
        assert torch.equal(x, y)
    outs = [[torch.zeros(10), torch.zeros(4)] for _ in range(2)]
    bad = a[:-1].clone()
    s1 = torch.ops.dgp.wire_accumulate([a, bad, a], [1.0, 1.0, 0.5], outs[0], [], False, False)
    s2 = wire._py_wire_accumulate([a, bad, a], [1.0, 1.0, 0.5], outs[1], [], False, False)
    assert torch.equal(s1, s2) and all(torch.equal(x, y) for x, y in zip(*outs))
    wire._py_wire_validate(a, [10, 4], None, False)
    with pytest.raises(ValueError, match="checksum"):
        wire._py_wire_validate(bad, [10, 4], None, False)


def test_codec_without_the_extension(tmp_path):
    """With dgp_kernels._C unimportable, the ops are served by the Python fallback."""
    import subprocess
    import sys

    code = (
        "import sys, warnings; sys.modules['dgp_kernels._C'] = None\n"
        "warnings.simplefilter('ignore')\n"
        "import torch, dgp_kernels\n"
        "from dgp_kernels.codec import wire, encode, decode, decode_accumulate, SparsePayload, LayerPayload\n"
        "assert dgp_kernels.backend_info().cpu == 'reference' and not wire.cpp_available()\n"
        "p = SparsePayload((LayerPayload(10, torch.tensor([1, 5, 7]), torch.tensor([0.5, -2.0, 3.0])),))\n"
        "d = encode(p)\n"
        "assert torch.equal(decode(d, [10]).layers[0].indices, torch.tensor([1, 5, 7]))\n"
        "t = torch.frombuffer(bytearray(d), dtype=torch.uint8)\n"
        "assert torch.equal(torch.ops.dgp.wire_encode([torch.tensor([1, 5, 7])], [torch.tensor([0.5, -2.0, 3.0])],"
        " [10], [-1], False, torch.empty(0, dtype=torch.uint8)), t)\n"
        "out = [torch.zeros(10)]\n"
        "assert decode_accumulate([d, d[:-1]], out).accepted == (0,) and out[0][5] == -2.0\n"
        "print('OK', d.hex())\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ref = encode(SparsePayload((LayerPayload(10, torch.tensor([1, 5, 7]), torch.tensor([0.5, -2.0, 3.0])),)))
    assert r.stdout.split()[-1] == ref.hex()  # same bytes as this process (C++ when built)
