"""Stage 7: what is wrong with a data set, found from its cached features (``featurekit audit``).

- :mod:`.run`: the audit: the stores read, the checks run, the files written under the folder's lock;
- :mod:`.rows`: the audited stores, checked as train-head checks them, rows streamed;
- :mod:`.exact`, :mod:`.near`, :mod:`.labels`, :mod:`.outliers`, :mod:`.oddities`: the checks;
  :mod:`.approximate`: faiss's inverted file for sets too large for the exact search;
- :mod:`.report`: audit.json, audit.md, contact sheets; :mod:`.settings`: :class:`AuditSettings` (no torch).
"""

from .._lazy import attach

__getattr__, __dir__, __all__ = attach(__name__, __file__)
