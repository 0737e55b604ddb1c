"""A tiny Flower app (ServerApp + ClientApp) for the federation test.

Loaded by Ray's simulation actors by reference, so it lives in an importable module.
Clients fit a softmax regression on their own slice of a synthetic, linearly separable
5-class problem; node 0 corrupts its payload in round 2 (a byte flipped after encoding).
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from dgp_kernels.integrations.flower import PAYLOAD_KEY, DGPFedAvg, DGPMod

FEATURES, CLASSES, PER_CLIENT = 100, 5, 64
NUM_CLIENTS, ROUNDS = 3, 4
CORRUPT_ROUND = 2
RESULT_ENV = "DGP_FLOWER_TEST_RESULT"


def _data(seed: int, n: int):
    teacher = torch.Generator().manual_seed(7)
    w = torch.randn(FEATURES, CLASSES, generator=teacher)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=g)
    return x, (x @ w).argmax(1)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(FEATURES, CLASSES)


def _evaluate(model: torch.nn.Module):
    x, y = _data(999, 512)
    with torch.no_grad():
        out = model(x)
    return float(torch.nn.functional.cross_entropy(out, y)), float((out.argmax(1) == y).float().mean())


def _corrupt_mod(msg: Message, context: Context, call_next) -> Message:
    """Outermost mod of the test client: node with partition 0 flips one payload byte in
    round CORRUPT_ROUND (after DGPMod encoded it)."""
    reply = call_next(msg, context)
    rnd = int(msg.content["config"]["server-round"])
    if context.node_config["partition-id"] == 0 and rnd == CORRUPT_ROUND and not reply.has_error():
        rec = reply.content["arrays"]
        data = bytearray(rec[PAYLOAD_KEY].numpy().tobytes())
        data[len(data) // 2] ^= 0x10
        from flwr.app import Array

        reply.content["arrays"] = ArrayRecord({PAYLOAD_KEY: Array(np.frombuffer(bytes(data), np.uint8).copy())})
    return reply


client = ClientApp(mods=[_corrupt_mod, DGPMod("dgp", {"top": 0.05, "keep": 0.2})])


@client.train()
def train(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)
    pid = int(context.node_config["partition-id"])
    model = _model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = _data(pid, PER_CLIENT)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(5):  # a few local steps (FedAvg)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    content = RecordDict({
        "arrays": ArrayRecord(model.state_dict()),
        "metrics": MetricRecord({"train_loss": float(loss.detach()), "num-examples": PER_CLIENT}),
    })
    return Message(content=content, reply_to=msg)


server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    strategy = DGPFedAvg(
        fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=NUM_CLIENTS,
        min_available_nodes=NUM_CLIENTS,
    )

    def central(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = _model()
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, acc = _evaluate(model)
        return MetricRecord({"loss": loss, "accuracy": acc})

    result = strategy.start(
        grid=grid, initial_arrays=ArrayRecord(_model().state_dict()), num_rounds=ROUNDS,
        timeout=120.0, evaluate_fn=central,
    )
    evals = {int(r): dict(m) for r, m in result.evaluate_metrics_serverapp.items()}
    history = [
        {"round": h.round, "accepted": list(h.accepted), "upload_bytes": list(h.upload_bytes),
         "rejected": [list(x) for x in h.rejected], "dense_bytes": h.dense_bytes}
        for h in strategy.history
    ]
    with open(os.environ[RESULT_ENV], "w") as f:
        json.dump({"evals": evals, "history": history}, f)


def run_federation(result_path: str, ray_tmp: str) -> None:
    """Run the federation in Flower's simulation engine (Ray); the ServerApp writes its
    results to ``result_path``. Meant to run in a child process the test can bound and kill."""
    os.environ[RESULT_ENV] = result_path
    os.environ["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] = "0"  # silences a Ray FutureWarning
    import ray
    from flwr.simulation import run_simulation

    try:
        run_simulation(
            server_app=server, client_app=client, num_supernodes=NUM_CLIENTS,
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": {"num_cpus": 2, "include_dashboard": False, "_temp_dir": ray_tmp},
            },
        )
    finally:
        if ray.is_initialized():
            ray.shutdown()
