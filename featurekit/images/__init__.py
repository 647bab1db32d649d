"""Stage 1: the images of a data set, listed deterministically and decoded once.

- :mod:`.listing`: ``root/<split>/<class>/<image>`` -> a :class:`SplitListing` (sorted records, what was left out);
- :mod:`.sources`: where a split's images come from (a folder, a class folder cut by :mod:`.splits`, a file list
  :mod:`.lists`, WebDataset shards :mod:`.shards`) -> the same :class:`SplitListing`;
- :mod:`.decode`: any file -> 8-bit RGB under a recorded :class:`DecodePolicy`, or one-line refusal;
- :mod:`.names`: the printable, injective form in which names are stored and shown.
"""

from .._lazy import attach

__getattr__, __dir__, __all__ = attach(__name__, __file__)
