"""hmt: a runtime for the Hierarchical Memory Transformer (HMT) around any transformers causal LM."""
from .api import generate, ingest, new_state
from .backbones import load_backbone
from .config import HMTConfig
from .memory import MemoryState
from .model import HMTModel, HMTOutput

__all__ = ["HMTConfig", "HMTModel", "HMTOutput", "MemoryState", "load_backbone", "generate", "ingest", "new_state"]
__version__ = "0.1.0"
