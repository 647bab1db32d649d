from .registry import REGISTRY as REGISTRY
from .registry import BackboneSpec as BackboneSpec
from .runner import TrunkRunner as TrunkRunner
from .runner import embed as embed
from .settings import BackboneChoice as BackboneChoice
from .settings import RunSettings as RunSettings
from .trunks import Backbone as Backbone
from .trunks import load_backbone as load_backbone
