"""Stage 3: the one registry of backbones, their weights, the frozen trunks and the runner that feeds them.

- :mod:`.registry`: the entries and names, without importing torch;
- :mod:`.weights`: where parameters come from, and the sha256 proving which were used;
- :mod:`.trunks`: :func:`load_backbone` -> a :class:`Backbone` (trunk, preprocessing, identity);
- :mod:`.sources` (:mod:`.timm_source`, :mod:`.open_clip_source`, :mod:`.hf_source`): the same for
  other libraries' models, ``timm:``, ``open_clip:``, ``hf:``, with each library's own preprocessing;
- :mod:`.runner`: :class:`TrunkRunner`, decode once -> views -> prepared trunks -> features, for every stage;
- :mod:`.rebuild`: the trunks of a store's or head's recorded identity, rebuilt and checked.
"""

from .._lazy import attach

__getattr__, __dir__, __all__ = attach(__name__, __file__)
