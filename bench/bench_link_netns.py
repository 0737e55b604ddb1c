"""A rate-limited loopback in a private network namespace, for the slow-link benchmarks.

    python bench/bench_link_netns.py 200mbit        # self-check: shape lo, measure, clean up

How it works: the benchmark re-executes itself under ``unshare -n`` (``-rn`` when not root),
so it runs in a fresh network namespace whose only interface is its own ``lo``. There it
brings ``lo`` up and puts a token-bucket filter on it (``tc qdisc replace dev lo root tbf
rate R burst B limit L``). Every process the benchmark starts inherits the namespace, and
all their traffic (gloo's TCP connections, Flower's gRPC) goes to 127.0.0.1, so it all
leaves through that one qdisc: **the rate limits the sum of every process's traffic**, like
a shared link. The namespace disappears when its last process exits; :class:`ShapedLink`
also removes the qdisc on exit.

Safety: :func:`check_private_netns` refuses to run ``tc`` unless this process is in a
network namespace other than the one it was started from (or other than pid 1's) and the
namespace holds no interface but ``lo``; nothing outside the namespace is touched.

Loud failure: :meth:`ShapedLink.verify` checks ``tc qdisc show dev lo`` names a ``tbf`` at
the requested rate *and* times a real TCP transfer over 127.0.0.1; a measured rate outside
``[0.6, 1.15] x`` the requested rate raises ``RuntimeError`` (no silent unshaped runs).

Byte counting: :func:`lo_bytes` reads the transmit byte counter of ``lo`` from
``/proc/net/dev`` (every packet between two local processes is counted once, headers
included): the difference over a run is the total traffic all processes put on the link.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from typing import List, Optional

ENV_PARENT = "DGP_LINK_PARENT_NETNS"

# tbf's burst must hold at least one packet: lo's MTU is 64 KiB. 256 KiB lets a packet
# through at any rate without noticeable bursts (at 50 Mbit/s: 40 ms worth of data).
BURST_BYTES = 256 * 1024
# Queue length in bytes: large enough that TCP's queued segments are never dropped (drops on
# lo mean retransmit timeouts, which would measure TCP, not the link).
LIMIT_BYTES = 64 * 1024 * 1024


def parse_rate(rate: str) -> int:
    """``"200mbit"``, ``"1gbit"``, ``"50Mbit"``, ``"800kbit"`` -> bits per second."""
    if not isinstance(rate, str):
        raise TypeError(f"rate must be a string like '200mbit', got {type(rate).__name__}")
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmg]?)bit\s*", rate.lower())
    if not m:
        raise ValueError(f"rate must look like '50mbit', '200mbit' or '1gbit', got {rate!r}")
    bits = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]
    if bits < 1e5:
        raise ValueError(f"rate must be at least 100kbit, got {rate!r}")
    return int(bits)


def netns_id(pid: str = "self") -> Optional[str]:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


def unshare_available() -> bool:
    """Whether ``unshare`` can create a network namespace here (and ``ip``/``tc`` exist)."""
    if not (shutil.which("unshare") and shutil.which("ip") and shutil.which("tc")):
        return False
    flags = "-n" if os.geteuid() == 0 else "-rn"
    try:
        r = subprocess.run(["unshare", flags, "true"], capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def reexec_in_netns(argv: Optional[List[str]] = None) -> None:
    """Re-execute ``python argv...`` in a fresh network namespace unless already in one that
    this function created. Does not return in the parent (``os.execvp``)."""
    if os.environ.get(ENV_PARENT):
        return
    if not shutil.which("unshare"):
        raise RuntimeError("unshare (util-linux) is not installed: cannot create a network namespace")
    argv = list(sys.argv if argv is None else argv)
    env = dict(os.environ)
    env[ENV_PARENT] = netns_id() or "unknown"
    flags = "-n" if os.geteuid() == 0 else "-rn"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe("unshare", ["unshare", flags, sys.executable, *argv], env)


def _run(cmd: List[str]) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout


def check_private_netns() -> None:
    """Raise ``RuntimeError`` unless this process is in a private network namespace holding
    only ``lo`` (so ``tc``/``ip`` here cannot touch a real interface)."""
    mine = netns_id()
    if mine is None:
        raise RuntimeError("cannot read /proc/self/ns/net: refusing to shape any link")
    parent = os.environ.get(ENV_PARENT)
    init = netns_id("1")
    if parent is None and init is None:
        raise RuntimeError("not started through reexec_in_netns and pid 1's namespace is unreadable: "
                           "refusing to shape a link that may be the host's")
    if mine == parent or mine == init:
        raise RuntimeError(f"this process is in its parent's network namespace ({mine}); "
                           "refusing to run tc outside a private namespace (use reexec_in_netns)")
    names = [l.split(":")[1].strip().split("@")[0] for l in _run(["ip", "-o", "link", "show"]).splitlines() if l.strip()]
    if names != ["lo"]:
        raise RuntimeError(f"the namespace holds interfaces {names}, expected only lo: refusing to shape")


def lo_bytes() -> int:
    """Bytes transmitted on ``lo`` so far in this namespace (``/proc/net/dev``)."""
    with open("/proc/net/dev") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name.strip() == "lo":
                return int(rest.split()[8])
    raise RuntimeError("no lo in /proc/net/dev")


def qdisc_show() -> str:
    return _run(["tc", "-s", "qdisc", "show", "dev", "lo"]).strip()


def measure_rate(nbytes: int, timeout: float = 60.0, port: int = 0, host: str = "127.0.0.1") -> float:
    """Time one TCP transfer of ``nbytes`` to ``host:port`` on lo (port 0: any free port);
    bits per second (payload only)."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, port))
    srv.listen(1)
    port = srv.getsockname()[1]
    got = [0]

    def recv() -> None:
        conn, _ = srv.accept()
        conn.settimeout(timeout)
        with conn:
            while got[0] < nbytes:
                chunk = conn.recv(1 << 20)
                if not chunk:
                    break
                got[0] += len(chunk)

    t = threading.Thread(target=recv, daemon=True)
    t.start()
    cli = socket.create_connection((host, port), timeout=timeout)
    buf = b"\0" * (1 << 20)
    t0 = time.perf_counter()
    with cli:
        sent = 0
        while sent < nbytes:
            sent += cli.send(buf[: min(len(buf), nbytes - sent)])
        t.join(timeout)
    dt = time.perf_counter() - t0
    srv.close()
    if got[0] != nbytes:
        raise RuntimeError(f"rate probe received {got[0]} of {nbytes} bytes")
    return 8.0 * nbytes / dt


class ShapedLink:
    """``with ShapedLink("200mbit") as link:`` — lo limited to the rate inside the block.

    ``rate=None`` leaves lo unshaped (the machine's loopback speed), still in the private
    namespace. ``link.measured_bps`` is the probe's rate; ``link.stats()`` the qdisc's
    counters (sent bytes, drops, overlimits)."""

    def __init__(self, rate: Optional[str], probe_s: float = 0.4) -> None:
        self.rate = rate
        self.bps = parse_rate(rate) if rate is not None else None
        self.probe_s = probe_s
        self.measured_bps: Optional[float] = None

    def __enter__(self) -> "ShapedLink":
        check_private_netns()
        _run(["ip", "link", "set", "lo", "up"])
        if self.bps is not None:
            _run(["tc", "qdisc", "replace", "dev", "lo", "root", "tbf", "rate", f"{self.bps}bit",
                  "burst", str(BURST_BYTES), "limit", str(LIMIT_BYTES)])
        try:
            self.verify()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def verify(self) -> None:
        """Raise ``RuntimeError`` unless ``tc`` shows our tbf and a real transfer runs at the
        requested rate (0.6x to 1.15x)."""
        if self.bps is None:
            self.measured_bps = measure_rate(64 << 20)
            return
        show = qdisc_show()
        m = re.search(r"qdisc tbf \S+ root .*?rate (\S+)", show)
        if not m:
            raise RuntimeError(f"lo has no root tbf qdisc: the link is not shaped (tc says: {show!r})")
        nbytes = max(1 << 20, int(self.bps / 8 * self.probe_s))
        self.measured_bps = measure_rate(nbytes)
        ratio = self.measured_bps / self.bps
        if not 0.6 <= ratio <= 1.15:
            raise RuntimeError(f"lo is not shaped to {self.rate}: a {nbytes}-byte transfer ran at "
                               f"{self.measured_bps / 1e6:.1f} Mbit/s ({ratio:.2f}x the requested rate)")

    def stats(self) -> dict:
        show = qdisc_show()
        out = {"qdisc": show.splitlines()[0] if show else ""}
        m = re.search(r"Sent (\d+) bytes (\d+) pkt \(dropped (\d+), overlimits (\d+)", show)
        if m:
            out.update(sent_bytes=int(m.group(1)), packets=int(m.group(2)), dropped=int(m.group(3)),
                       overlimits=int(m.group(4)))
        return out

    def __exit__(self, *exc) -> None:
        if self.bps is not None:
            subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], capture_output=True, timeout=30)
            if "tbf" in qdisc_show():
                raise RuntimeError("could not remove the tbf qdisc from lo")


class ShapedAddress:
    """``with ShapedAddress("50mbit", "127.0.0.2") as link:`` — only IPv4 traffic to or from
    one loopback address is limited (an ``htb`` class with ``u32`` filters on source and
    destination address); the rest of lo (127.0.0.1) runs at loopback speed. For a
    deployment whose local hops (a server process and its broker on one host) are not the
    slow link: the remote side connects to the other address. ``link.sent_bytes()``: bytes
    that went through the limited class so far (both directions)."""

    def __init__(self, rate: str, ip: str = "127.0.0.2", probe_s: float = 0.4) -> None:
        if not isinstance(ip, str) or not re.fullmatch(r"127\.\d+\.\d+\.\d+", ip) or ip == "127.0.0.1":
            raise ValueError(f"ip must be a loopback address other than 127.0.0.1, got {ip!r}")
        self.rate, self.bps, self.ip, self.probe_s = rate, parse_rate(rate), ip, probe_s
        self.measured_bps: Optional[float] = None

    def __enter__(self) -> "ShapedPort":
        check_private_netns()
        _run(["ip", "link", "set", "lo", "up"])
        cmds = [
            ["tc", "qdisc", "replace", "dev", "lo", "root", "handle", "1:", "htb", "default", "20", "r2q", "100000"],
            ["tc", "class", "add", "dev", "lo", "parent", "1:", "classid", "1:10", "htb", "rate", f"{self.bps}bit",
             "burst", str(BURST_BYTES), "cburst", str(BURST_BYTES)],
            ["tc", "class", "add", "dev", "lo", "parent", "1:", "classid", "1:20", "htb", "rate", "100gbit"],
            ["tc", "filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio", "1", "u32",
             "match", "ip", "dst", f"{self.ip}/32", "flowid", "1:10"],
            ["tc", "filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio", "1", "u32",
             "match", "ip", "src", f"{self.ip}/32", "flowid", "1:10"],
        ]
        try:
            for c in cmds:
                _run(c)
            nbytes = max(1 << 20, int(self.bps / 8 * self.probe_s))
            self.measured_bps = measure_rate(nbytes, host=self.ip)
            ratio = self.measured_bps / self.bps
            if not 0.6 <= ratio <= 1.15:
                raise RuntimeError(f"{self.ip} on lo is not shaped to {self.rate}: a {nbytes}-byte "
                                   f"transfer ran at {self.measured_bps / 1e6:.1f} Mbit/s ({ratio:.2f}x)")
            other = measure_rate(max(1 << 20, nbytes))
            if other < 2 * self.bps:
                raise RuntimeError(f"127.0.0.1 runs at {other / 1e6:.1f} Mbit/s: the filter shapes more than {self.ip}")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        self.base = self.sent_bytes()
        return self

    def sent_bytes(self) -> int:
        show = _run(["tc", "-s", "class", "show", "dev", "lo", "classid", "1:10"])
        m = re.search(r"Sent (\d+) bytes", show)
        if not m:
            raise RuntimeError(f"no htb class 1:10 on lo: {show!r}")
        return int(m.group(1))

    def __exit__(self, *exc) -> None:
        subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], capture_output=True, timeout=30)
        if "htb" in qdisc_show():
            raise RuntimeError("could not remove the htb qdisc from lo")


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    rate = argv[0] if argv else "200mbit"
    parse_rate(rate)
    reexec_in_netns([os.path.abspath(__file__), rate])
    with ShapedLink(rate) as link:
        b0 = lo_bytes()
        print(f"namespace {netns_id()} (parent {os.environ.get(ENV_PARENT)}): lo shaped to {rate}, "
              f"probe {link.measured_bps / 1e6:.1f} Mbit/s, lo tx {lo_bytes() - b0} B since probe")
        print(link.stats())
    print("qdisc after exit:", qdisc_show() or "(none)")


if __name__ == "__main__":
    main()
