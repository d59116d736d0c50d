"""MemoryState: everything HMT carries between segments, in fixed-size buffers (spec "One segment").

One state holds B sequences.  Per row: the memory ring buffer with its cached keys, the sensory ids, the tokens
of the current segment so far, the tail of the previous segment (the causal recall query and the provisional
paper-mode query), and the recalled memory ``P`` of the current segment.  The backbone's KV cache of the current
segment is not part of the state: the engine that runs a row holds it, and rebuilds it from ``P``, the sensory ids
and the segment tokens when a loaded state is resumed, so a saved state stays small and independent of the attention backend.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .atomic import path_text, staged_file
from .checks import checksum_metadata, verify_checksums
from .config import SAVED_DEFAULTS

_TENSORS = (
    "memory", "keys", "written", "sensory_ids", "sensory_len", "segment_ids", "segment_len",
    "tail_ids", "tail_len", "recalled", "provisional", "started", "segments_done",
    "slot_ids", "slot_len", "replay_ids", "replay_len",
)
_REPLAY = ("slot_ids", "slot_len", "replay_ids", "replay_len")  # absent from files of configs without replay
_SLOTTED = ("memory", "keys", "slot_ids", "slot_len")  # one entry per ring-buffer slot (dimension 1)


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
    slot_ids: (B, N, S) int64, the window ids (sensory + segment) that wrote each slot, S = k + Ls with
        ``config.replay`` (else 0); slot_len: (B, N) how many.
    replay_ids: (B, replay * S) int64, the slots' ids the current segment replays (docs/spec.md "Replay at the
        end of a prompt"); replay_len: (B,) how many (0: none).
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
    slot_ids: torch.Tensor
    slot_len: torch.Tensor
    replay_ids: torch.Tensor
    replay_len: torch.Tensor

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
            slot_ids=torch.zeros(batch_size, config.memory_slots, config.slot_tokens, **long),
            slot_len=torch.zeros(batch_size, config.memory_slots, **long),
            replay_ids=torch.zeros(batch_size, config.replay * config.slot_tokens, **long),
            replay_len=torch.zeros(batch_size, **long),
        )
        return state

    @property
    def batch_size(self) -> int:
        return self.memory.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in _TENSORS}

    def clone(self) -> "MemoryState":
        """A deep copy."""
        return MemoryState(**{name: t.clone() for name, t in self.tensors().items()})

    def row(self, index: int) -> "MemoryState":
        """Row ``index`` as a batch-1 state sharing storage with this one (writes go through)."""
        return MemoryState(**{name: t[index : index + 1] for name, t in self.tensors().items()})

    @classmethod
    def stack(cls, rows: list["MemoryState"]) -> "MemoryState":
        return cls(**{name: torch.cat([getattr(r, name) for r in rows]) for name in _TENSORS})

    def validate(self, config=None, width: int | None = None, vocab_size: int | None = None,
                 where: str = "state") -> "MemoryState":
        """Check structure, shapes, ranges and finite values; returns ``self``, raises ValueError (TypeError for a
        field that is not a tensor) naming ``where`` (a file or "state"), the field and what was expected.

        config: the HMTConfig the state must fit (N, d_h, k, Ls, j); without it the sizes are taken from the
        state's own buffers.  width: the backbone's embedding width d.  vocab_size: ids must lie in
        [0, vocab_size).  Checked: every field a tensor of the right kind (float / int64-like / bool) and shape
        (B, ...) with one B; lengths in [0, buffer size]; counters >= 0; a segment with tokens or a
        provisional P is started; ids in the vocabulary; memory, keys and recalled finite.
        """
        for name in _TENSORS:
            if not isinstance(getattr(self, name, None), torch.Tensor):
                value = getattr(self, name, None)
                raise TypeError(f"{where}: field {name!r} is {type(value).__name__}; expected a torch.Tensor")
        batch = self.memory.shape[0] if self.memory.dim() else -1
        if batch < 1:
            raise ValueError(f"{where}: field 'memory' has shape {tuple(self.memory.shape)}; expected (B, N, d) "
                             "with B >= 1")
        slots = config.memory_slots if config is not None else self.memory.shape[1] if self.memory.dim() > 1 else -1
        dim = config.recall_dim if config is not None else self.keys.shape[-1] if self.keys.dim() == 3 else -1
        width = width if width is not None else self.memory.shape[-1] if self.memory.dim() == 3 else -1
        k = config.sensory_tokens if config is not None else self.sensory_ids.shape[-1]
        ls = config.segment_tokens if config is not None else self.segment_ids.shape[-1]
        j = config.summary_tokens if config is not None else self.tail_ids.shape[-1]
        per_slot = config.slot_tokens if config is not None else self.slot_ids.shape[-1]
        replayed = config.replay * config.slot_tokens if config is not None else self.replay_ids.shape[-1]
        shapes = {
            "memory": (batch, slots, width), "keys": (batch, slots, dim), "recalled": (batch, width),
            "sensory_ids": (batch, k), "segment_ids": (batch, ls), "tail_ids": (batch, j),
            "slot_ids": (batch, slots, per_slot), "slot_len": (batch, slots), "replay_ids": (batch, replayed),
        }
        shapes.update({name: (batch,) for name in _TENSORS if name not in shapes})
        for name, shape in shapes.items():
            tensor = getattr(self, name)
            if tuple(tensor.shape) != shape:
                dims = {"memory": "(B, N, d)", "keys": "(B, N, d_h)", "recalled": "(B, d)", "sensory_ids": "(B, k)",
                        "segment_ids": "(B, Ls)", "tail_ids": "(B, j)", "slot_ids": "(B, N, k + Ls)",
                        "slot_len": "(B, N)", "replay_ids": "(B, replay x (k + Ls))"}.get(name, "(B,)")
                raise ValueError(f"{where}: field {name!r} has shape {tuple(tensor.shape)}; expected {dims} = {shape}")
            if name in ("memory", "keys", "recalled"):
                if not tensor.is_floating_point():
                    raise ValueError(f"{where}: field {name!r} has dtype {tensor.dtype}; expected a floating dtype")
            elif name in ("provisional", "started"):
                if tensor.dtype != torch.bool:
                    raise ValueError(f"{where}: field {name!r} has dtype {tensor.dtype}; expected torch.bool")
            elif tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
                raise ValueError(f"{where}: field {name!r} has dtype {tensor.dtype}; expected an integer dtype "
                                 "(torch.long)")
        limits = {"written": None, "segments_done": None, "sensory_len": k, "segment_len": ls, "tail_len": j,
                  "slot_len": per_slot, "replay_len": replayed}
        for name, high in limits.items():
            tensor = getattr(self, name)
            if not tensor.numel():
                continue
            low_v, high_v = int(tensor.min()), int(tensor.max())
            if low_v < 0 or (high is not None and high_v > high):
                bad = low_v if low_v < 0 else high_v
                expected = f"[0, {high}]" if high is not None else ">= 0"
                raise ValueError(f"{where}: field {name!r} holds {bad}; expected values in {expected}")
        for name in ("segment_len", "provisional"):
            pending = getattr(self, name).bool() & ~self.started
            if bool(pending.any()):
                row = int(pending.nonzero()[0, 0])
                raise ValueError(f"{where}: row {row} has {name}={getattr(self, name)[row].item()} but started=False; "
                                 "expected a started segment")
        for name in ("sensory_ids", "segment_ids", "tail_ids", "slot_ids", "replay_ids"):
            tensor = getattr(self, name)
            if tensor.numel():
                low_v, high_v = int(tensor.min()), int(tensor.max())
                if low_v < 0 or (vocab_size is not None and high_v >= vocab_size):
                    bad = low_v if low_v < 0 else high_v
                    expected = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
                    raise ValueError(f"{where}: field {name!r} holds token id {bad}; expected ids in {expected}")
        for name in ("memory", "keys", "recalled"):
            tensor = getattr(self, name)
            if tensor.numel() and not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{where}: field {name!r} holds NaN or infinite values; expected finite values")
        return self

    def save(self, path: str | os.PathLike, config=None, metadata: dict[str, str] | None = None) -> None:
        """Write the state to a safetensors file atomically (a failed save leaves an existing file intact).

        The file records a sha256 checksum of every tensor (checked by ``load``) and, with ``config``, the
        HMTConfig it was made for; ``metadata``: more string entries for the file's header.  Only the ring
        buffer slots written so far are stored (a short document makes a small file); ``load`` restores the
        empty ones."""
        path = path_text(path, "path", "a file path")
        if os.path.isdir(path):
            raise IsADirectoryError(f"path={path!r} is a folder; expected a file path for the memory state")
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"path={path!r}: the folder {folder!r} does not exist")
        tensors = {k: v.detach().cpu() for k, v in self.tensors().items()}
        slots = tensors["memory"].shape[1]
        used = min(int(tensors["written"].max()), slots) if tensors["written"].numel() else slots
        for name in _SLOTTED:
            tensors[name] = tensors[name][:, :used]
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        meta = {**(metadata or {}), "format": "hmt-memory-state", "version": "1", "memory_slots": str(slots),
                **checksum_metadata(tensors)}
        if config is not None:
            meta["hmt_config"] = json.dumps(config.to_dict())
        with staged_file(path) as tmp:
            save_file(tensors, tmp, metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike, config=None, device=None, width: int | None = None,
             vocab_size: int | None = None) -> "MemoryState":
        """Read a state written by ``save`` and ``validate`` it (with ``config``, ``width`` and ``vocab_size``
        when given: the sizes of the model it will be used with; a state saved with another HMT config is
        refused).  Raises FileNotFoundError, IsADirectoryError or ValueError naming the file and the field."""
        path = path_text(path, "path", "a file path")
        if os.path.isdir(path):
            raise IsADirectoryError(f"MemoryState.load({path!r}): is a folder; expected a file written by "
                                    "MemoryState.save")
        if not os.path.exists(path):
            raise FileNotFoundError(f"MemoryState.load({path!r}): no such file")
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                if meta.get("format") != "hmt-memory-state":
                    raise ValueError("its metadata has no format 'hmt-memory-state'")
                present = set(f.keys())
                missing = [name for name in _TENSORS if name not in present and name not in _REPLAY]
                if missing:
                    raise ValueError(f"fields {missing} are missing")
                tensors = {name: f.get_tensor(name) for name in _TENSORS if name in present}
        except Exception as err:  # safetensors raises several error types for a file that is not one
            raise ValueError(f"{path!r} is not an HMT memory state file ({err})") from err
        verify_checksums(path, tensors, meta)
        _no_replay(path, tensors)
        _restore_slots(path, tensors, meta)
        if config is not None and "hmt_config" in meta:
            try:
                saved = json.loads(meta["hmt_config"])
            except ValueError as err:
                raise ValueError(f"{path!r}: metadata field 'hmt_config' is damaged ({err})") from None
            if not isinstance(saved, dict):
                raise ValueError(f"{path!r}: metadata field 'hmt_config' is not a JSON object")
            ours = config.to_dict()
            saved = {**SAVED_DEFAULTS, **saved}
            diff = {k: (saved.get(k), ours[k]) for k in ours if k != "kernels" and saved.get(k) != ours[k]}
            if diff:
                raise ValueError(f"memory state {path!r} was made with another HMT config: {diff} (saved, this model)")
        state = cls(**tensors)
        state.validate(config, width=width, vocab_size=vocab_size, where=repr(path))
        if device is not None:
            state = cls(**{k: v.to(device) for k, v in tensors.items()})
        return state


def _restore_slots(path: str, tensors: dict, meta: dict) -> None:
    """Pad the ring buffer of a file that stores only its written slots back to ``memory_slots`` slots."""
    slots = meta.get("memory_slots")
    if slots is None:
        return
    try:
        slots = int(slots)
    except ValueError:
        raise ValueError(f"{path!r}: metadata field 'memory_slots' is not an integer") from None
    written = tensors["written"]
    used = min(int(written.max()), slots) if written.dim() == 1 and written.numel() else 0
    for name in _SLOTTED:
        t = tensors[name]
        if t.dim() != (2 if name == "slot_len" else 3) or t.shape[1] >= slots:
            continue  # a whole ring buffer, or a shape that validate() refuses
        if used > t.shape[1]:
            raise ValueError(f"{path!r}: field {name!r} stores {t.shape[1]} memory slots of {slots} but {used} "
                             "were written")
        pad = torch.zeros(t.shape[0], slots - t.shape[1], *t.shape[2:], dtype=t.dtype)
        tensors[name] = torch.cat([t, pad], dim=1)


def _no_replay(path: str, tensors: dict) -> None:
    """The replay fields of a file written before they existed (or of a config without replay): empty."""
    if all(name in tensors for name in _REPLAY):
        return
    if any(name in tensors for name in _REPLAY):
        raise ValueError(f"{path!r} is not an HMT memory state file (fields "
                         f"{[n for n in _REPLAY if n not in tensors]} are missing)")
    memory = tensors["memory"]
    batch, slots = (memory.shape[0], memory.shape[1]) if memory.dim() == 3 else (0, 0)
    tensors["slot_ids"] = torch.zeros(batch, slots, 0, dtype=torch.long)
    tensors["slot_len"] = torch.zeros(batch, slots, dtype=torch.long)
    tensors["replay_ids"] = torch.zeros(batch, 0, dtype=torch.long)
    tensors["replay_len"] = torch.zeros(batch, dtype=torch.long)
