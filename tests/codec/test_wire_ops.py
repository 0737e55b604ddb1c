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
