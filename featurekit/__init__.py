"""featurekit: cached-feature extraction for image transfer learning.

images -> decode once -> per-backbone views -> frozen trunks -> HDF5 stores -> feature dataset -> head

The public Python API (docs/api.md), imported on first use so that ``import featurekit`` and the
command line's ``--help`` stay fast:

- :func:`extract` (``featurekit.extraction.extract``): write the stores, as ``featurekit extract`` does;
- :func:`load` (``featurekit.dataset.load_features``): a split of several stores, aligned, in memory;
- :class:`FeatureDataset`: the same rows, read lazily, for a torch DataLoader;
- :func:`embed` (``featurekit.runner.embed``): features of a few images, no store;
- :func:`train_head`, :func:`load_head` and :func:`predict_files`: heads, as train-head and predict;
- :func:`finetune` and :class:`FinetuneSettings`: a head's trunks and classifier trained on images;
- :class:`ExtractSettings`, :class:`RunSettings`, :func:`load_backbone`, :class:`FeaturekitError`.
"""

import importlib
import os
from typing import TYPE_CHECKING

# torch and scikit-learn each bundle a libgomp; with both loaded, threads that spin while waiting
# made small torch steps (the MLP head) 30x slower on a 2-core machine (0.39 -> 12 s per epoch in
# benchmarks/bench_head.py). Passive waiting removes that; it must be set before torch loads, and
# a value the user chose is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

_API = {
    "extract": ("extraction.engine", "extract"),
    "ExtractSettings": ("extraction.engine", "ExtractSettings"),
    "load": ("store.dataset", "load_features"),
    "FeatureDataset": ("store.dataset", "FeatureDataset"),
    "FeatureSet": ("store.dataset", "FeatureSet"),
    "embed": ("backbones.runner", "embed"),
    "RunSettings": ("backbones.runner", "RunSettings"),
    "load_backbone": ("backbones.trunks", "load_backbone"),
    "load_head": ("heads.head_file", "load_head"),
    "train_head": ("heads.train", "train_head"),
    "predict_files": ("predict.classify", "predict_files"),
    "finetune": ("finetuning.run", "finetune"),
    "FinetuneSettings": ("finetuning.loop", "FinetuneSettings"),
    "FeaturekitError": ("errors", "FeaturekitError"),
}
__all__ = sorted(_API)

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports on first use
    from .backbones.runner import RunSettings as RunSettings
    from .backbones.runner import embed as embed
    from .backbones.trunks import load_backbone as load_backbone
    from .errors import FeaturekitError as FeaturekitError
    from .extraction.engine import ExtractSettings as ExtractSettings
    from .extraction.engine import extract as extract
    from .finetuning.loop import FinetuneSettings as FinetuneSettings
    from .finetuning.run import finetune as finetune
    from .heads.head_file import load_head as load_head
    from .heads.train import train_head as train_head
    from .predict.classify import predict_files as predict_files
    from .store.dataset import FeatureDataset as FeatureDataset
    from .store.dataset import FeatureSet as FeatureSet
    from .store.dataset import load_features as load  # noqa: F401


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'featurekit' has no attribute {name!r}")
    module, attribute = _API[name]
    value = getattr(importlib.import_module(f".{module}", __name__), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
