"""Stages 5-6: the HDF5 feature store (the one place that knows its format) and the feature dataset.

- :mod:`.format`: the schema (:class:`StoreIdentity`, :class:`StoreHeader`), readers and checksums;
- :mod:`.layout`: where a store keeps the views of each image beside its plain row;
- :mod:`.chunks`: the chunk commit protocol a store is written through (crash-safe, resumable);
- :mod:`.writer`: a store's life cycle (:class:`StoreWriter`): reuse, refuse, lock, resume, join;
- :mod:`.verify`: integrity and freshness checks; :mod:`.dataset`: stores of several backbones, aligned;
- :mod:`.export`: a split's features as parquet or npy (:class:`~featurekit.store.settings.ExportSettings`).
"""

from .._lazy import attach

__getattr__, __dir__, __all__ = attach(__name__, __file__)
