"""Thin collaborative-learning simulator (FedSGD / FedAvg) and the models it trains.

Clients and a server exchange real encoded payloads (:mod:`dgp_kernels.codec`) produced by
the compressors (:mod:`dgp_kernels.compressor`), so every byte counted is a byte that would
cross the network. See README.md beside this file.

    from dgp_kernels.sim import SimConfig, simulate
    res = simulate(SimConfig(defense="dgp", rounds=150))
    res.final_accuracy, res.total_upload_bytes

Only torch is needed to import this package; the built-in ``digits`` data needs
scikit-learn, the progress bar tqdm, the plots matplotlib (``pip install "dgp_kernels[eval]"``).
"""

from .config import Fault, SimConfig, parse_defense_params
from .data import available_datasets, dataset_info, load_dataset
from .results import SimResult
from .simulator import build_model, simulate

__all__ = [
    "Fault",
    "SimConfig",
    "SimResult",
    "available_datasets",
    "build_model",
    "dataset_info",
    "load_dataset",
    "parse_defense_params",
    "simulate",
]
