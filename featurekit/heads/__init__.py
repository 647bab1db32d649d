"""Stage 7: classifier heads on cached features, trained, chosen, written and reported.

- :mod:`.base`, :mod:`.linear`, :mod:`.knn`, :mod:`.mlp`: the estimators (scikit-learn's rules);
  :mod:`.registry` names them; :mod:`.solver`: the L-BFGS solver of the linear heads;
- :mod:`.head_file`: a fitted head as HDF5 arrays + JSON (never a pickle);
- :mod:`.train`: ``train-head``: fit, select, evaluate, write; :mod:`.report`: report files and plots;
- :mod:`.fewshot`: ``evaluate``: k training images per class, several draws, mean and interval.
"""

from .._lazy import attach

__getattr__, __dir__, __all__ = attach(__name__, __file__)
