"""featurekit: cached-feature extraction for image transfer learning.

    images -> decode once -> per-backbone views -> frozen trunks -> store writer -> HDF5 stores
           -> feature dataset -> head -> report / predictions

One subpackage per stage, in that order: :mod:`~featurekit.images`, :mod:`~featurekit.views`,
:mod:`~featurekit.backbones`, :mod:`~featurekit.extraction`, :mod:`~featurekit.store`,
:mod:`~featurekit.heads`, :mod:`~featurekit.finetuning`, :mod:`~featurekit.predict` (beside it,
:mod:`~featurekit.cache`: what a features folder holds), and the command line, :mod:`~featurekit.cli`.
A module imports only from its own stage and the ones before it (tests/test_layout.py);
:mod:`~featurekit.errors`, :mod:`~featurekit.files` and :mod:`~featurekit.devices` serve all of them.

The public Python API (docs/api.md) is listed in ``__init__.pyi`` and imported on first use, so
that ``import featurekit`` and the command line's ``--help`` stay fast: :func:`extract`,
:func:`load` (a split of several stores, aligned, in memory), :class:`FeatureDataset` (the same
rows, read lazily, for a DataLoader), :func:`export` (a split as parquet or npy), :func:`embed`
(features of a few images, no store), :func:`train_head`, :func:`load_head`, :func:`predict_files`,
:func:`predict_store`, :func:`finetune`, their settings, :func:`load_backbone` and :class:`FeaturekitError`.
"""

import os

# torch and scikit-learn each bundle a libgomp; with both loaded, threads that spin while waiting
# made small torch steps (the MLP head) 30x slower on a 2-core machine (0.39 -> 12 s per epoch in
# benchmarks/bench_head.py). Passive waiting removes that; it must be set before torch loads, and
# a value the user chose is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

from ._lazy import attach  # noqa: E402  (after the environment is set

__getattr__, __dir__, __all__ = attach(__name__, __file__)
