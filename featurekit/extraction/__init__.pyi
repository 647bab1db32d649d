from .engine import ExtractSettings as ExtractSettings
from .engine import StoreResult as StoreResult
from .engine import extract as extract
