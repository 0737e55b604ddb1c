"""Defense specs (dgp_kernels.spec): one syntax for dgp train, dgp evaluate, SimConfig and the
attack API; malformed specs fail with a message naming the spec."""

import pytest

from dgp_kernels.attacks.defenses import parse_defense
from dgp_kernels.sim import SimConfig
from dgp_kernels.spec import format_spec, parse_spec, parse_value, split_specs


def test_parse_spec():
    assert parse_spec("dgp") == ("dgp", {})
    assert parse_spec(" DGP : top = 0.1 , keep=0.2 ") == ("dgp", {"top": "0.1", "keep": "0.2"})
    assert parse_spec("dp:clip=1,noise_multiplier=0.01") == (
        "dp", {"clip": "1", "noise_multiplier": "0.01"})


@pytest.mark.parametrize("spec,match", [
    ("dgp:", "nothing after ':'"),
    (":top=0.1", "no defense name"),
    ("dgp:top", "expected param=value pairs"),
    ("dgp:top=", "expected param=value pairs"),
    ("dgp:top=0.1,,keep=0.2", "expected param=value pairs"),
    ("dgp:top=0.1,top=0.2", "given twice"),
])
def test_parse_spec_errors(spec, match):
    with pytest.raises(ValueError, match=match) as exc:
        parse_spec(spec)
    assert repr(spec) in str(exc.value)


def test_parse_spec_type_error():
    with pytest.raises(TypeError, match="must be a str"):
        parse_spec(0.1)


def test_split_specs():
    assert split_specs(["none,dgp:top=0.1,keep=0.2,topk", "qsgd:levels=8"]) == [
        "none", "dgp:top=0.1,keep=0.2", "topk", "qsgd:levels=8"]
    assert split_specs(["none", "dgp"]) == ["none", "dgp"]
    assert split_specs([" none , "]) == ["none"]
    with pytest.raises(ValueError, match="no defense name before it"):
        split_specs(["top=0.1,dgp"])


def test_format_spec_round_trips():
    assert format_spec("dgp", {}) == "dgp"
    assert format_spec("dgp", {"top": 0.1, "error_feedback": False}) == "dgp:top=0.1,error_feedback=False"
    name, raw = parse_spec(format_spec("dgp", {"top": 0.1, "keep": 0.25}))
    assert name == "dgp" and {k: parse_value(v) for k, v in raw.items()} == {"top": 0.1, "keep": 0.25}


def test_simconfig_accepts_a_spec():
    cfg = SimConfig(defense="dgp:top=0.1,error_feedback=false", defense_params={"keep": 0.3})
    assert cfg.defense == "dgp"
    assert cfg.defense_params == {"keep": 0.3, "top": 0.1, "error_feedback": False}
    assert cfg.validate() is cfg
    assert SimConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="given both"):
        SimConfig(defense="dgp:top=0.1", defense_params={"top": 0.2})
    with pytest.raises(ValueError, match="SimConfig.defense: defense 'dgp:top'"):
        SimConfig(defense="dgp:top")
    with pytest.raises(ValueError, match=r"defense 'dgp': .*top"):
        SimConfig(defense="dgp:top=0.9,keep=0.5").validate()


def test_attack_side_uses_the_same_syntax():
    assert parse_defense("dgp:top=0.1").label == "dgp:top=0.1,keep=0.2"
    for bad, match in (("dgp:", "nothing after ':'"), ("dgp:top", "param=value"),
                       ("dgp:top=0.1,top=0.2", "given twice")):
        with pytest.raises(ValueError, match=match):
            parse_defense(bad)
