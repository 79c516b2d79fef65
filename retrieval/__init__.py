"""Search a video collection with a DGL model: index, query, results page, attention pictures."""
from .index import Hit, VideoIndex
from .model_io import SearchError, load_model, model_fingerprint

__all__ = ["Hit", "SearchError", "VideoIndex", "load_model", "model_fingerprint"]
