"""MemoryState: everything HMT carries between segments, in fixed-size buffers (spec "One segment").

One state holds B sequences.  Per row: the memory ring buffer with its cached keys, the sensory ids, the tokens
of the current segment so far, the tail of the previous segment (the causal recall query and the provisional
paper-mode query), and the recalled memory ``P`` of the current segment.  The backbone's KV cache of the current
segment is runtime data (``kv``): it is never saved, and is rebuilt from ``P``, the sensory ids and the segment
tokens when a loaded state is resumed, so a saved state stays small and independent of the attention backend.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .atomic import staged_file

_TENSORS = (
    "memory", "keys", "written", "sensory_ids", "sensory_len", "segment_ids", "segment_len",
    "tail_ids", "tail_len", "recalled", "provisional", "started", "segments_done",
)


@dataclass
class MemoryState:
    """HMT state of B sequences.

    memory: (B, N, d) ring buffer of memory embeddings M_n; keys: (B, N, d_h) their keys M_n W_k^T.
    written: (B,) int64, memories written so far (valid slots: min(written, N); next slot: written % N).
    sensory_ids: (B, k) int64, the last k ids of the previous segment; sensory_len: (B,) 0 before segment 1.
    segment_ids: (B, Ls) int64, tokens of the current segment; segment_len: (B,) how many.
    tail_ids: (B, j) int64, the last j ids before the current segment; tail_len: (B,).
    recalled: (B, d), P of the current segment (valid once the segment has started).
    provisional: (B,) bool, P came from a provisional query (paper mode, fewer than j tokens known).
    started: (B,) bool, the current segment has begun (``recalled`` is valid).
    segments_done: (B,) int64, completed segments.
    kv: the backbone's cache for the current segment of each row (runtime only; None = rebuild on next use).
    """

    memory: torch.Tensor
    keys: torch.Tensor
    written: torch.Tensor
    sensory_ids: torch.Tensor
    sensory_len: torch.Tensor
    segment_ids: torch.Tensor
    segment_len: torch.Tensor
    tail_ids: torch.Tensor
    tail_len: torch.Tensor
    recalled: torch.Tensor
    provisional: torch.Tensor
    started: torch.Tensor
    segments_done: torch.Tensor
    kv: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.kv:
            self.kv = [None] * self.memory.shape[0]

    @classmethod
    def empty(cls, config, batch_size: int, width: int, device=None, dtype=torch.float32) -> "MemoryState":
        long = dict(dtype=torch.long, device=device)
        state = cls(
            memory=torch.zeros(batch_size, config.memory_slots, width, device=device, dtype=dtype),
            keys=torch.zeros(batch_size, config.memory_slots, config.recall_dim, device=device, dtype=dtype),
            written=torch.zeros(batch_size, **long),
            sensory_ids=torch.zeros(batch_size, config.sensory_tokens, **long),
            sensory_len=torch.zeros(batch_size, **long),
            segment_ids=torch.zeros(batch_size, config.segment_tokens, **long),
            segment_len=torch.zeros(batch_size, **long),
            tail_ids=torch.zeros(batch_size, config.summary_tokens, **long),
            tail_len=torch.zeros(batch_size, **long),
            recalled=torch.zeros(batch_size, width, device=device, dtype=dtype),
            provisional=torch.zeros(batch_size, dtype=torch.bool, device=device),
            started=torch.zeros(batch_size, dtype=torch.bool, device=device),
            segments_done=torch.zeros(batch_size, **long),
        )
        return state

    @property
    def batch_size(self) -> int:
        return self.memory.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in _TENSORS}

    def clone(self) -> "MemoryState":
        """A deep copy of the saved part; the live KV caches are dropped (rebuilt on next use)."""
        return MemoryState(**{name: t.clone() for name, t in self.tensors().items()})

    def row(self, index: int) -> "MemoryState":
        """Row ``index`` as a batch-1 state sharing storage with this one (writes go through)."""
        state = MemoryState(**{name: t[index : index + 1] for name, t in self.tensors().items()})
        state.kv = self.kv[index : index + 1]
        return state

    @classmethod
    def stack(cls, rows: list["MemoryState"]) -> "MemoryState":
        state = cls(**{name: torch.cat([getattr(r, name) for r in rows]) for name in _TENSORS})
        state.kv = [kv for r in rows for kv in r.kv]
        return state

    def save(self, path: str | os.PathLike, config=None) -> None:
        """Write the state to a safetensors file atomically (a failed save leaves an existing file intact)."""
        path = os.fspath(path)
        meta = {"format": "hmt-memory-state", "version": "1"}
        if config is not None:
            meta["hmt_config"] = json.dumps(config.to_dict())
        with staged_file(path) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in self.tensors().items()}, tmp, metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike, config=None, device=None) -> "MemoryState":
        """Read a state written by ``save``; with ``config``, check it was made for the same sizes."""
        path = os.fspath(path)
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                if meta.get("format") != "hmt-memory-state":
                    raise ValueError("not an HMT memory state")
                tensors = {name: f.get_tensor(name) for name in _TENSORS}
        except FileNotFoundError:
            raise
        except Exception as err:  # safetensors raises several error types for a file that is not one
            raise ValueError(f"{path!r} is not an HMT memory state file ({err})") from err
        if config is not None and "hmt_config" in meta:
            saved = json.loads(meta["hmt_config"])
            ours = config.to_dict()
            diff = {k: (saved.get(k), ours[k]) for k in ours if k != "kernels" and saved.get(k) != ours[k]}
            if diff:
                raise ValueError(f"memory state {path!r} was made with another HMT config: {diff} (saved, this model)")
        return cls(**{k: (v.to(device) if device is not None else v) for k, v in tensors.items()})
