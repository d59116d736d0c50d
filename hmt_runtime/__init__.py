"""hmt: a runtime for the Hierarchical Memory Transformer (HMT) around any transformers causal LM.

The package is layered (docs/layout.md): core < native < incremental < model < training, serving < the CLI; each
layer imports only from the layers below it.
"""
from .core.config import HMTConfig
from .core.memory import MemoryState
from .incremental.generation import generate, ingest, new_state
from .model.hmt import HMTModel, HMTOutput
from .model.loading import load_backbone

__all__ = ["HMTConfig", "HMTModel", "HMTOutput", "MemoryState", "load_backbone", "generate", "ingest", "new_state"]
__version__ = "0.1.0"
