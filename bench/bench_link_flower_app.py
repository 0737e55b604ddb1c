"""The Flower App of ``bench_link_flower.py`` (ServerApp + ClientApp), copied into a
temporary app directory and submitted with ``flwr run``; not imported by the benchmark.

Run config (``--run-config``): ``mod`` (``"none"``, ``"dgp"`` or ``"dgp_bf16"``),
``rounds``, ``model`` (a ``dgp_kernels.cases.models`` name), ``batch``, ``result`` (where the
ServerApp writes its JSON). Each client takes one SGD step on random CIFAR-shaped data per
round; the server is ``FedAvg`` (``mod="none"``) or ``DGPFedAvg``. The ServerApp records per
round the wall time (from sending the train messages to the aggregate) and the bytes of
the messages as Flower counts them (``ArrayRecord``/``MetricRecord``/``ConfigRecord``
``count_bytes()``).
"""

from __future__ import annotations

import json
import time

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from dgp_kernels.cases.models import get_model
from dgp_kernels.integrations.flower import DGPFedAvg, DGPMod

_MODS = {
    "dgp": DGPMod("dgp", {"top": 0.05, "keep": 0.2}),
    "dgp_bf16": DGPMod("dgp", {"top": 0.05, "keep": 0.2, "value_dtype": "bfloat16"}),
}


def _content_bytes(content: RecordDict) -> int:
    return sum(rec.count_bytes() for rec in content.values())


def choose_mod(msg: Message, context: Context, call_next) -> Message:
    """The run config's mod (``none``: pass through)."""
    mod = _MODS.get(str(context.run_config["mod"]))
    return call_next(msg, context) if mod is None else mod(msg, context, call_next)


client = ClientApp(mods=[choose_mod])


@client.train()
def train(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)
    pid = int(context.node_config["partition-id"])
    rnd = int(msg.content["config"]["server-round"])
    model = get_model(str(context.run_config["model"]))
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    g = torch.Generator().manual_seed(1000 * pid + rnd)
    b = int(context.run_config["batch"])
    x, y = torch.randn(b, 3, 32, 32, generator=g), torch.randint(0, 10, (b,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    content = RecordDict({
        "arrays": ArrayRecord(model.state_dict()),
        "metrics": MetricRecord({"train_loss": float(loss.detach()), "num-examples": b}),
    })
    return Message(content=content, reply_to=msg)


def _timed(base):
    class Timed(base):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.rounds = []
            self._t0 = 0.0
            self._down = 0

        def configure_train(self, server_round, arrays, config, grid):
            self._t0 = time.perf_counter()
            msgs = list(super().configure_train(server_round, arrays, config, grid))
            self._down = sum(_content_bytes(m.content) for m in msgs)
            return msgs

        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            up = [_content_bytes(m.content) for m in replies if not m.has_error()]
            out = super().aggregate_train(server_round, replies)
            self.rounds.append({"round": server_round, "seconds": time.perf_counter() - self._t0,
                                "upload_bytes": up, "download_bytes": self._down,
                                "errors": sum(1 for m in replies if m.has_error())})
            return out

    return Timed


server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    nodes = len(list(grid.get_node_ids()))
    strategy = _timed(FedAvg if str(cfg["mod"]) == "none" else DGPFedAvg)(
        fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=nodes, min_available_nodes=nodes)
    torch.manual_seed(0)
    model = get_model(str(cfg["model"]))
    t0 = time.perf_counter()
    strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=int(cfg["rounds"]),
                   timeout=1800.0)
    with open(str(cfg["result"]), "w") as f:
        json.dump({"mod": str(cfg["mod"]), "nodes": nodes, "total_s": time.perf_counter() - t0,
                   "rounds": strategy.rounds,
                   "dense_bytes": sum(v.numel() * v.element_size() for v in model.state_dict().values())}, f)
