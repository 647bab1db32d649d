from .classify import Predictions as Predictions
from .classify import predict_files as predict_files
from .classify import predict_store as predict_store
from .neighbors import neighbors_report as neighbors_report
from .neighbors import search as search
from .settings import NeighborsSettings as NeighborsSettings
