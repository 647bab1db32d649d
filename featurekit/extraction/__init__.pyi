from .engine import StoreResult as StoreResult
from .engine import extract as extract
from .settings import ExtractSettings as ExtractSettings
