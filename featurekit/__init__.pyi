__version__: str

from .auditing.run import audit as audit
from .auditing.settings import AuditSettings as AuditSettings
from .backbones.runner import embed as embed
from .backbones.settings import BackboneChoice as BackboneChoice
from .backbones.settings import RunSettings as RunSettings
from .backbones.trunks import load_backbone as load_backbone
from .errors import FeaturekitError as FeaturekitError
from .errors import FeaturekitWarning as FeaturekitWarning
from .extraction.engine import extract as extract
from .extraction.settings import ExtractSettings as ExtractSettings
from .finetuning.run import finetune as finetune
from .finetuning.settings import FinetuneSettings as FinetuneSettings
from .heads.fewshot import evaluate_few_shot as evaluate_few_shot
from .heads.head_file import load_head as load_head
from .heads.settings import EvaluateSettings as EvaluateSettings
from .heads.train import train_head as train_head
from .images.sources import SourceSettings as SourceSettings
from .predict.classify import predict_files as predict_files
from .predict.classify import predict_store as predict_store
from .store.dataset import FeatureDataset as FeatureDataset
from .store.dataset import FeatureSet as FeatureSet
from .store.dataset import load_features as load
from .store.export import export as export
from .store.settings import ExportSettings as ExportSettings
