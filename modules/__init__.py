"""DGL library: the CLIP backbone, the tokenizer, the DGL model and retrieval metrics."""
from .clip import CLIP, CLIPConfig, build_clip, load_clip_state_dict, tiny_clip_config
from .dgl import DGL, DGLConfig
from .tokenizer import SimpleTokenizer, get_tokenizer, tokenize

__all__ = ["CLIP", "CLIPConfig", "DGL", "DGLConfig", "SimpleTokenizer", "build_clip", "get_tokenizer",
           "load_clip_state_dict", "tiny_clip_config", "tokenize"]
