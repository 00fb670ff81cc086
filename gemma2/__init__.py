"""gemma2: a clean, fast PyTorch reimplementation of Google's Gemma 2."""

from .chat import Chat
from .checkpoint import CheckpointError, load_model, save_model
from .config import PRESETS, Gemma2Config
from .generation import Session, generate, stream
from .kv_cache import KVCache
from .model import Gemma2ForCausalLM
from .tokenizer import Tokenizer

__all__ = [
    "PRESETS", "CheckpointError", "Chat", "Gemma2Config", "Gemma2ForCausalLM", "KVCache", "Session",
    "Tokenizer", "generate", "load_model", "save_model", "stream",
]  # fmt: skip
