"""What the simulator trains and the attacks target: models, datasets and target images.

This layer sits below both :mod:`dgp_kernels.sim` and :mod:`dgp_kernels.attacks` so that
neither imports the other:

* :mod:`.models` — the models of the DGP literature in pure torch (CIFAR ResNet-18, the
  sigmoid LeNet of DLG, a small ConvNet, an MLP), by name through :func:`get_model`.
* :mod:`.datasets` — offline datasets (scikit-learn's digits; MNIST and CIFAR from files on
  disk) and their partition across clients.
* :mod:`.targets` — the images an attack tries to reconstruct (bundled scikit-image photos
  or a dataset's test split), as a :class:`TargetSet`.

Only torch and numpy are needed to import it; the digits need scikit-learn and the photos
scikit-image (``pip install "dgp_kernels[eval]"``).
"""

from .datasets import available_datasets, dataset_info, dirichlet_split, iid_split, load_dataset
from .models import MODELS, get_model
from .targets import PHOTO_NAMES, TargetSet, available_target_sources, load_photos, load_targets

__all__ = [
    "MODELS",
    "PHOTO_NAMES",
    "TargetSet",
    "available_datasets",
    "available_target_sources",
    "dataset_info",
    "dirichlet_split",
    "get_model",
    "iid_split",
    "load_dataset",
    "load_photos",
    "load_targets",
]
