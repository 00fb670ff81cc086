"""gemma2: a clean, fast PyTorch reimplementation of Google's Gemma 2."""

from .config import PRESETS, Gemma2Config
from .kv_cache import KVCache
from .model import Gemma2ForCausalLM

__all__ = ["PRESETS", "Gemma2Config", "Gemma2ForCausalLM", "KVCache"]
