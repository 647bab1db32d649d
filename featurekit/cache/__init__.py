"""Stage 7: the cache as files: what a features folder holds, checked, described, measured and tidied.

- :mod:`.artifacts`: stores, heads, fine-tuned models and the leftovers of runs under any folder;
  ``verify`` and ``info`` of any of them;
- :mod:`.housekeeping`: ``du`` (sizes and ages) and ``clean`` (leftovers removed under the stores' locks);
- :mod:`.settings`: :class:`CleanSettings` (no torch).
"""

from .._lazy import attach

__getattr__, __dir__, __all__ = attach(__name__, __file__)
