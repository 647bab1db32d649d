from .artifact import load_classifier as load_classifier
from .run import finetune as finetune
from .settings import FinetuneSettings as FinetuneSettings
