"""Stage 4: trunks run once over each split, rows committed in chunks to the stores.

- :mod:`.engine`: :func:`extract`, the chunks still missing, background commits;
- :mod:`.distributed`: torchrun ranks and ``--shard I/N`` processes sharing one extraction.
"""

from .._lazy import attach

__getattr__, __dir__, __all__ = attach(__name__, __file__)
