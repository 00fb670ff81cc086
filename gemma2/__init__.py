"""gemma2: a clean, fast PyTorch reimplementation of Google's Gemma 2."""

from .checkpoint import CheckpointError, load_model, save_model
from .config import PRESETS, Gemma2Config
from .kv_cache import KVCache
from .model import Gemma2ForCausalLM

__all__ = ["PRESETS", "CheckpointError", "Gemma2Config", "Gemma2ForCausalLM", "KVCache", "load_model", "save_model"]
