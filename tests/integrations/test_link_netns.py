"""The slow-link benchmarks' namespace helper (bench/bench_link_netns.py): it shapes lo only
inside a private network namespace, measures that the shaping works, fails loudly when it
does not, and leaves no qdisc behind. Real namespaces and real tc (skipped only where
``unshare`` cannot create a network namespace)."""

import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(REPO, "bench")
sys.path.insert(0, BENCH)
import bench_link_netns as netns  # noqa: E402

needs_unshare = pytest.mark.skipif(not netns.unshare_available(), reason="unshare -n is not available here")


def _in_netns(code: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run python ``code`` in a fresh network namespace, as reexec_in_netns would."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([BENCH, REPO]))
    env[netns.ENV_PARENT] = netns.netns_id() or "unknown"
    flags = "-n" if os.geteuid() == 0 else "-rn"
    return subprocess.run(["unshare", flags, sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_parse_rate():
    assert netns.parse_rate("200mbit") == 200_000_000
    assert netns.parse_rate("1Gbit") == 1_000_000_000
    assert netns.parse_rate("800kbit") == 800_000
    for bad in ("200", "fast", "10bit", "-5mbit"):
        with pytest.raises(ValueError, match="rate"):
            netns.parse_rate(bad)
    with pytest.raises(TypeError, match="rate"):
        netns.parse_rate(200)
    with pytest.raises(ValueError, match="ip"):
        netns.ShapedAddress("50mbit", "127.0.0.1")


def test_refuses_to_shape_outside_a_private_namespace(monkeypatch):
    monkeypatch.delenv(netns.ENV_PARENT, raising=False)
    before = subprocess.run(["tc", "qdisc", "show", "dev", "lo"], capture_output=True, text=True).stdout \
        if os.path.exists("/sbin/tc") or os.path.exists("/usr/sbin/tc") else None
    with pytest.raises(RuntimeError, match="refusing"):
        netns.ShapedLink("50mbit").__enter__()
    with pytest.raises(RuntimeError, match="refusing"):
        netns.ShapedAddress("50mbit").__enter__()
    if before is not None:  # this namespace's lo is untouched
        assert subprocess.run(["tc", "qdisc", "show", "dev", "lo"], capture_output=True, text=True).stdout == before


@needs_unshare
def test_shapes_measures_and_cleans_up():
    r = _in_netns("""
        import bench_link_netns as n
        with n.ShapedLink("100mbit") as link:
            assert "tbf" in n.qdisc_show()
            b0 = n.lo_bytes()
            n.measure_rate(1 << 20)
            assert n.lo_bytes() - b0 >= 1 << 20   # the transfer is counted on lo
            print("probe", link.measured_bps)
        assert "tbf" not in n.qdisc_show()
        with n.ShapedAddress("100mbit") as link:
            assert link.sent_bytes() >= 1 << 20
        assert "htb" not in n.qdisc_show()
        print("clean")
    """)
    assert r.returncode == 0, r.stderr
    probe = float(r.stdout.split("probe")[1].split()[0])
    assert 0.6e8 <= probe <= 1.15e8
    assert "clean" in r.stdout


@needs_unshare
def test_fails_loudly_when_the_link_is_not_shaped():
    r = _in_netns("""
        import subprocess, bench_link_netns as n
        link = n.ShapedLink("100mbit").__enter__()
        subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], check=True)   # behind its back
        try:
            link.verify()
        except RuntimeError as e:
            print("raised:", e)
        orig = n.measure_rate
        n.measure_rate = lambda nbytes, **kw: 1e12     # a probe that sees an unlimited link
        try:
            n.ShapedLink("100mbit").__enter__()
        except RuntimeError as e:
            print("raised:", e)
        assert "tbf" not in n.qdisc_show()            # cleaned up after the failure too
    """)
    assert r.returncode == 0, r.stderr
    lines = [l for l in r.stdout.splitlines() if l.startswith("raised:")]
    assert len(lines) == 2, r.stdout
    assert "no root tbf" in lines[0]
    assert "not shaped to 100mbit" in lines[1]
