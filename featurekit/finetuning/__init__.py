"""Stage 7b: a head's trunks and classifier trained on images, warm-started exactly from the head.

- :mod:`.model`: the model rebuilt from a head; :mod:`.loop`: one epoch and one evaluation;
- :mod:`.run`: ``finetune``: checkpoints, resume, the kept epoch, reports;
- :mod:`.artifact`: the fine-tuned model as files (``model.json``), and finding any classifier file.
"""

from .._lazy import attach

__getattr__, __dir__, __all__ = attach(__name__, __file__)
