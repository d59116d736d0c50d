"""The memory store of `hmt serve`: documents kept as memory-state files in one folder (see
hmt_runtime.serving.server, "Memory states")."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import time
from pathlib import Path


from ..core.atomic import clean_partials
from ..core.memory import MemoryState
from .protocol import log


# ============================================================================================== memory store
_MEMORY_ID = re.compile(r"^[0-9a-f]{32}$")
_MEMORY_SUFFIX = ".safetensors"


class UnusableMemory(Exception):
    """A memory file that cannot be read with this model (another HMT config, damaged, not a file)."""


class MemoryStore:
    """Memory states as ``<id>.safetensors`` files in ``directory``; nothing is kept in process, so several
    servers can share the folder.  A file's mtime is its last use.  ``max_memories``: files kept (the least
    recently used beyond it are removed when one is added; None or 0: no cap).  Unknown or malformed ids raise
    KeyError, files that cannot be used UnusableMemory."""

    def __init__(self, directory, model, max_memories: int | None = None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.model, self.max_memories = model, max_memories or None
        self.clean()

    def path(self, memory_id: str) -> Path:
        if not isinstance(memory_id, str) or not _MEMORY_ID.match(memory_id):
            raise KeyError(memory_id)
        return self.directory / (memory_id + _MEMORY_SUFFIX)

    def clean(self) -> int:
        """Remove partial files of killed saves (never those of saves in progress)."""
        return clean_partials(self.directory, r"[0-9a-f]{32}" + re.escape(_MEMORY_SUFFIX))

    def add(self, state: MemoryState, tokens: int) -> str:
        self.clean()
        memory_id = secrets.token_hex(16)
        state.save(self.path(memory_id), config=self.model.config,
                   metadata={"created": str(int(time.time())), "tokens": str(int(tokens))})
        self.evict(keep=memory_id)
        return memory_id

    def load(self, memory_id: str) -> MemoryState:
        path = self.path(memory_id)
        try:
            state = MemoryState.load(path, config=self.model.config, device=self.model.device)
        except FileNotFoundError:
            raise KeyError(memory_id) from None
        except (OSError, ValueError, TypeError) as err:
            log.warning("memory %s cannot be used: %s", memory_id, err)
            raise UnusableMemory(memory_id) from None
        with contextlib.suppress(OSError):
            os.utime(path)  # its last use
        return state

    def _entry(self, path: Path) -> dict | None:
        """id, tokens, bytes, created, last_used of a memory file (from its header); None if it is not one."""
        try:
            stat = path.stat()
        except OSError:
            return None
        if not path.is_file():
            return None
        from safetensors import safe_open

        meta = {}
        with contextlib.suppress(Exception):  # an old or damaged file: the stat fields only
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        entry = {"id": path.name[: -len(_MEMORY_SUFFIX)], "object": "memory", "tokens": None, "bytes": stat.st_size,
                 "created": int(stat.st_mtime), "last_used": int(stat.st_mtime)}
        for name in ("tokens", "created"):
            with contextlib.suppress(KeyError, ValueError):
                entry[name] = int(meta[name])
        return entry

    def info(self, memory_id: str) -> dict:
        path = self.path(memory_id)
        if not path.exists():
            raise KeyError(memory_id)
        entry = self._entry(path)
        if entry is None:
            raise UnusableMemory(memory_id)
        if entry["tokens"] is None:  # a file from before tokens were recorded
            entry["tokens"] = state_tokens(self.load(memory_id), self.model.config)
        return entry

    def entries(self) -> list[dict]:
        """Every memory, the most recently used first."""
        entries = [self._entry(path) for path in self._files()]
        return sorted((e for e in entries if e is not None), key=lambda e: e["last_used"], reverse=True)

    def _files(self) -> list[Path]:
        try:
            names = os.listdir(self.directory)
        except OSError:
            return []
        return [self.directory / n for n in names
                if n.endswith(_MEMORY_SUFFIX) and _MEMORY_ID.match(n[: -len(_MEMORY_SUFFIX)])]

    def delete(self, memory_id: str) -> None:
        path = self.path(memory_id)
        try:
            path.unlink()
        except FileNotFoundError:
            raise KeyError(memory_id) from None
        except OSError:  # e.g. a folder of that name
            raise UnusableMemory(memory_id) from None

    def evict(self, keep: str | None = None) -> int:
        """Remove the least recently used files beyond ``max_memories``; returns how many."""
        if not self.max_memories:
            return 0
        dated = []
        for path in self._files():
            with contextlib.suppress(OSError):
                if path.is_file():
                    dated.append((path.stat().st_mtime_ns, path))
        dated.sort()
        removed = 0
        for _, path in dated[: max(0, len(dated) - self.max_memories)]:
            if keep is not None and path.name == keep + _MEMORY_SUFFIX:
                continue
            with contextlib.suppress(OSError):
                path.unlink()
                removed += 1
                log.info("memory %s removed (--max-memories %d)", path.name[: -len(_MEMORY_SUFFIX)], self.max_memories)
        return removed

    def total_bytes(self) -> int:
        total = 0
        for path in self._files():
            with contextlib.suppress(OSError):
                if path.is_file():
                    total += path.stat().st_size
        return total


def state_tokens(state: MemoryState, config) -> int:
    """Tokens read into a batch-1 state: full segments of Ls tokens plus the current segment's."""
    return int(state.segments_done[0]) * config.segment_tokens + int(state.segment_len[0])


