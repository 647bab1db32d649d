from .classify import Predictions as Predictions
from .classify import predict_files as predict_files
from .classify import predict_store as predict_store
