from .loop import FinetuneSettings as FinetuneSettings
from .run import finetune as finetune
