from .run import finetune as finetune
from .settings import FinetuneSettings as FinetuneSettings
