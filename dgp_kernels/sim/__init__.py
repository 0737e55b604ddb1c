"""Thin collaborative-learning simulator (FedSGD / FedAvg) and the models it trains.

Clients and a server exchange real encoded payloads (:mod:`dgp_kernels.codec`) produced by
the compressors (:mod:`dgp_kernels.compressor`), so every byte counted is a byte that would
cross the network. See README.md beside this file.

    from dgp_kernels.sim import SimConfig, simulate
    res = simulate(SimConfig(defense="dgp", rounds=150))
    res.final_accuracy, res.total_upload_bytes
    runs = simulate_seeds([SimConfig(defense="none"), SimConfig(defense="dgp")], seeds=range(5))
    runs.summary()   # mean ± std per defense, paired difference vs none

Only torch is needed to import this package; the built-in ``digits`` data needs
scikit-learn, the progress bar tqdm, the plots matplotlib (``pip install "dgp_kernels[eval]"``).
"""

from .config import Fault, SimConfig, parse_defenses
from ..cases.datasets import available_datasets, dataset_info, load_dataset
from .multiseed import MultiSeedResult, SeedStats, SeedSummaryRow, parse_seeds, simulate_seeds
from .results import SimResult
from .simulator import build_model, simulate, simulate_defense

__all__ = [
    "Fault",
    "MultiSeedResult",
    "SeedStats",
    "SeedSummaryRow",
    "SimConfig",
    "SimResult",
    "available_datasets",
    "build_model",
    "dataset_info",
    "load_dataset",
    "parse_defenses",
    "parse_seeds",
    "simulate",
    "simulate_defense",
    "simulate_seeds",
]
