"""A real Flower deployment over a slow link: SuperLink, SuperNodes and ``flwr run`` as
separate processes on loopback, with and without the DGP mod. Not part of `pytest`.

    python bench/bench_link_flower.py --quick                  # 3 nodes, 1 round, convnet
    nice -n 19 python bench/bench_link_flower.py --json flower.json   # ResNet-18, 4 nodes

The script re-executes itself in a private network namespace (``bench_link_netns.py``).
The SuperLink listens on the namespace's lo (port ``--port``); the SuperNodes connect to it
at **127.0.0.2**, and only traffic to or from 127.0.0.2 is limited to ``--rate`` (an ``htb``
class with address filters): that is the link between the server and its clients. The
ServerApp process talks to its SuperLink, and each SuperNode to its ClientApp process, over
127.0.0.1 at loopback speed (in a real deployment those hops are local too). Each mode gets
a fresh SuperLink and SuperNodes (``--isolation subprocess``: they start the ServerApp and
ClientApp processes) and a fresh ``FLWR_HOME`` in a temporary directory; runtime dependency
installation is disabled (the installed environment is used; no network is needed).

Reported per mode (``none`` = plain ``FedAvg``, ``dgp`` / ``dgp_bf16`` = ``DGPMod`` on the
clients and ``DGPFedAvg`` on the server): the wall time of each round as the ServerApp sees
it (sending the train messages to aggregating the replies), the bytes of the messages as
Flower counts them (``count_bytes()`` of the records: downloads to all nodes, uploads from
all nodes), and the bytes that crossed the limited link (the htb class counter: both
directions, TCP/IP and HTTP overhead included).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import bench_link_netns as netns  # noqa: E402

REMOTE_IP = "127.0.0.2"

PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "dgplinkapp"
version = "1.0.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "dgpkernels"

[tool.flwr.app.components]
serverapp = "dgplinkapp.app:server"
clientapp = "dgplinkapp.app:client"

[tool.flwr.app.config]
mod = "none"
rounds = 2
model = "resnet18_cifar"
batch = 8
result = "result.json"
"""


def _wait_port(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


def _stop(procs: List[subprocess.Popen]) -> None:
    """Stop the processes this script started (their own process groups), bounded."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 15
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(5)


def run_mode(mode: str, a, work: str, link: netns.ShapedAddress) -> Dict:
    home = os.path.join(work, f"flwr-{mode}")
    os.makedirs(home)
    with open(os.path.join(home, "config.toml"), "w") as f:
        f.write(f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{a.port}"\n'
                f"insecure = true\n")
    env = dict(os.environ, FLWR_HOME=home, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    logs = os.path.join(work, f"logs-{mode}")
    os.makedirs(logs)
    procs: List[subprocess.Popen] = []

    def start(name: str, cmd: List[str]) -> None:
        out = open(os.path.join(logs, name + ".log"), "w")
        procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))

    result = os.path.join(work, f"result-{mode}.json")
    try:
        start("superlink", ["flower-superlink", "--insecure", "--disable-runtime-dependency-installation",
                            "--host", "0.0.0.0", "--port", str(a.port)])
        _wait_port("127.0.0.1", a.port, 120)
        for i in range(a.nodes):
            start(f"supernode{i}", ["flower-supernode", "--insecure", "--superlink", f"{REMOTE_IP}:{a.port}",
                                    "--port", str(a.port + 10 + i),
                                    "--node-config", f"partition-id={i} num-partitions={a.nodes}"])
        for i in range(a.nodes):
            _wait_port("127.0.0.1", a.port + 10 + i, 120)
        time.sleep(a.settle)
        b0 = link.sent_bytes()
        t0 = time.perf_counter()
        cfg = f'mod="{mode}" rounds={a.rounds} model="{a.model}" batch={a.batch} result="{result}"'
        r = subprocess.run(["flwr", "run", os.path.join(work, "app"), "local", "--run-config", cfg, "--stream"],
                           env=env, capture_output=True, text=True, timeout=a.timeout)
        wall = time.perf_counter() - t0
        shaped = link.sent_bytes() - b0
        if not os.path.exists(result):
            tails = "\n".join(f"--- {n}\n" + open(os.path.join(logs, n)).read()[-3000:] for n in sorted(os.listdir(logs)))
            raise RuntimeError(f"flwr run ({mode}) wrote no result (exit {r.returncode}):\n{r.stdout[-3000:]}\n"
                               f"{r.stderr[-3000:]}\n{tails}")
        with open(result) as f:
            res = json.load(f)
        res.update(flwr_run_s=wall, shaped_bytes=shaped, load=os.getloadavg())
        return res
    finally:
        _stop(procs)


def print_report(out: Dict) -> None:
    print("# bench_link_flower: Flower deployment (SuperLink + SuperNodes + flwr run) over a limited link")
    for k, v in out["env"].items():
        print(f"#   {k}: {v}")
    base = next((r for r in out["runs"] if r["mod"] == "none"), None)
    print(f"{'mod':<10}{'nodes':>6}{'round s (median)':>17}{'vs none':>8}{'up MB/round':>12}{'down MB/round':>14}"
          f"{'up/dense':>9}{'link MB/round':>14}{'load':>6}")
    for r in out["runs"]:
        rounds = r["rounds"]
        med = statistics.median(x["seconds"] for x in rounds)
        up = statistics.median(sum(x["upload_bytes"]) for x in rounds)
        down = statistics.median(x["download_bytes"] for x in rounds)
        dense_up = r["dense_bytes"] * r["nodes"]
        vs = med / statistics.median(x["seconds"] for x in base["rounds"]) if base else float("nan")
        print(f"{r['mod']:<10}{r['nodes']:>6}{med:>17.2f}{vs:>8.2f}{up / 1e6:>12.2f}{down / 1e6:>14.2f}"
              f"{up / dense_up:>9.3f}{r['shaped_bytes'] / len(rounds) / 1e6:>14.2f}{r['load'][0]:>6.2f}")
        print(f"{'':<10}rounds: " + ", ".join(f"{x['seconds']:.2f} s" for x in rounds)
              + f"; errors {sum(x['errors'] for x in rounds)}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 nodes, 1 round, convnet_small")
    ap.add_argument("--rate", default="50mbit")
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", default="resnet18_cifar")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--modes", default="none,dgp,dgp_bf16")
    ap.add_argument("--port", type=int, default=18000)
    ap.add_argument("--settle", type=float, default=5.0, help="seconds for the SuperNodes to register")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per flwr run")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.quick:
        a.nodes, a.rounds, a.model = 3, 1, "convnet_small"
    netns.parse_rate(a.rate)
    if a.nodes < 1 or a.rounds < 1:
        ap.error("--nodes and --rounds must be >= 1")
    for tool in ("flower-superlink", "flower-supernode", "flwr"):
        if not shutil.which(tool):
            raise RuntimeError(f"{tool} is not on PATH (pip install 'dgp_kernels[flower]')")
    netns.reexec_in_netns([os.path.abspath(__file__)] + (sys.argv[1:] if argv is None else list(argv)))
    import flwr

    env = {"flwr": flwr.__version__ if hasattr(flwr, "__version__") else "?", "cores": os.cpu_count(),
           "rate": a.rate, "nodes": a.nodes, "rounds": a.rounds, "model": a.model, "batch": a.batch,
           "threads_per_process": 1, "nice": os.nice(0), "loadavg_start": os.getloadavg()}
    out = {"env": env, "runs": []}
    with tempfile.TemporaryDirectory() as work:
        app = os.path.join(work, "app")
        os.makedirs(os.path.join(app, "dgplinkapp"))
        with open(os.path.join(app, "pyproject.toml"), "w") as f:
            f.write(PYPROJECT)
        open(os.path.join(app, "dgplinkapp", "__init__.py"), "w").close()
        shutil.copy(os.path.join(HERE, "bench_link_flower_app.py"), os.path.join(app, "dgplinkapp", "app.py"))
        with netns.ShapedAddress(a.rate, REMOTE_IP) as link:
            env["probe_bps"] = link.measured_bps
            for mode in [m for m in a.modes.split(",") if m]:
                print(f"# {mode}: {a.nodes} SuperNodes, {a.rounds} rounds, {a.model} at {a.rate}", flush=True)
                out["runs"].append(run_mode(mode, a, work, link))
    env["loadavg_end"] = os.getloadavg()
    print_report(out)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
