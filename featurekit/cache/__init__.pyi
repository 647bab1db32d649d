from .artifacts import find_artifacts as find_artifacts
from .artifacts import info_paths as info_paths
from .artifacts import verify_paths as verify_paths
from .housekeeping import clean as clean
from .housekeeping import disk_usage as disk_usage
from .settings import CleanSettings as CleanSettings
