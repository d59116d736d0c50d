"""Text corpora for training and evaluation: reading files, tokenising, cutting training windows.

A corpus is a list of documents, each a 1-D LongTensor of token ids (one per text file).  Training windows never
cross a document boundary: a window of ``S`` segments is ``S * Ls`` consecutive tokens of one document, and
consecutive windows start ``Ls`` tokens apart, so every segment of a document is the scored (last) segment of
exactly one window (spec "Training").
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

TEXT_SUFFIXES = (".txt", ".md", ".text")


def text_files(paths) -> list[Path]:
    """The text files named by ``paths`` (a path or a list): files as given, folders searched recursively for
    ``*.txt``, ``*.md`` and ``*.text`` (sorted).  Raises FileNotFoundError for a missing path and ValueError for
    a folder with no text file."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
            if not found:
                raise ValueError(f"data path {str(path)!r}: folder has no text file (expected *{'/*'.join(TEXT_SUFFIXES)})")
            files.extend(found)
        else:
            raise FileNotFoundError(f"data path {str(path)!r}: no such file or folder")
    if not files:
        raise ValueError("data paths: expected at least one text file or folder, got none")
    return files


def read_text(path: Path) -> str:
    """The UTF-8 text of ``path``; ValueError for an empty file, whitespace only, or bytes that are not UTF-8."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"data file {str(path)!r}: not UTF-8 text (byte {err.start}: {data[err.start:err.start + 1]!r}); "
            "expected a UTF-8 text file"
        ) from None
    if not text.strip():
        raise ValueError(f"data file {str(path)!r}: empty; expected some text")
    return text


def tokenize_files(paths, tokenizer) -> list[torch.Tensor]:
    """One 1-D LongTensor of token ids per text file (no special tokens added)."""
    if tokenizer is None:
        raise ValueError("tokenizer: None; text needs the backbone's tokenizer")
    docs = []
    for path in text_files(paths):
        ids = tokenizer(read_text(path), add_special_tokens=False).input_ids
        docs.append(torch.tensor(ids, dtype=torch.long))
    return docs


def as_documents(corpus) -> list[torch.Tensor]:
    """Normalise token ids given directly: a 1-D tensor, a (B, S) tensor (one document per row) or a list of
    1-D tensors -> list of 1-D LongTensors."""
    if isinstance(corpus, torch.Tensor):
        if corpus.dim() == 1:
            return [corpus.long()]
        if corpus.dim() == 2:
            return [row.long() for row in corpus]
        raise ValueError(f"corpus: expected a 1-D or 2-D tensor of token ids, got shape {tuple(corpus.shape)}")
    docs = []
    for i, doc in enumerate(corpus):
        doc = torch.as_tensor(doc, dtype=torch.long)
        if doc.dim() != 1:
            raise ValueError(f"corpus[{i}]: expected a 1-D sequence of token ids, got shape {tuple(doc.shape)}")
        docs.append(doc)
    if not docs:
        raise ValueError("corpus: expected at least one document, got none")
    return docs


@dataclass
class Windows:
    """All training windows of ``length`` tokens, starting ``stride`` apart inside each document.

    ``starts``: (n_windows, 2) int64 of (document index, first token).  ``batch(indices)`` -> (len, length) ids.
    """

    docs: list[torch.Tensor]
    length: int
    stride: int
    starts: torch.Tensor

    @classmethod
    def build(cls, docs: list[torch.Tensor], segment_tokens: int, segments: int) -> "Windows":
        length = segment_tokens * segments
        starts = [
            (d, s) for d, doc in enumerate(docs) for s in range(0, doc.numel() - length + 1, segment_tokens)
        ]
        if not starts:
            longest = max(doc.numel() for doc in docs)
            raise ValueError(
                f"corpus: the longest document has {longest} tokens, shorter than one training window of "
                f"{segments} segments x {segment_tokens} tokens = {length}; expected more text or fewer segments"
            )
        return cls(docs, length, segment_tokens, torch.tensor(starts, dtype=torch.long))

    def __len__(self) -> int:
        return self.starts.shape[0]

    def batch(self, indices) -> torch.Tensor:
        rows = []
        for i in indices:
            doc, start = (int(v) for v in self.starts[int(i)])
            rows.append(self.docs[doc][start : start + self.length])
        return torch.stack(rows)


class WindowSampler:
    """Shuffled batches of window indices, epoch after epoch, with a position that can be saved and restored.

    The order of epoch ``e`` is a permutation drawn from a generator seeded with ``seed + e``: it depends only on
    (seed, epoch), not on the global RNG, so a resumed run draws exactly the batches an uninterrupted one would.
    """

    def __init__(self, n_windows: int, batch_size: int, seed: int = 0):
        if n_windows < 1:
            raise ValueError(f"n_windows={n_windows}: expected at least one window")
        self.n_windows, self.batch_size, self.seed = n_windows, batch_size, seed
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.n_windows, generator=gen)

    def next_batch(self) -> list[int]:
        """The next ``batch_size`` window indices (wrapping into the next epoch when needed)."""
        out = []
        while len(out) < self.batch_size:
            if self.cursor >= self.n_windows:
                self.epoch += 1
                self.cursor = 0
                self._order = self._permutation(self.epoch)
            out.append(int(self._order[self.cursor]))
            self.cursor += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "n_windows": self.n_windows, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["n_windows"] != self.n_windows:
            raise ValueError(
                f"checkpoint data position: made for {state['n_windows']} windows, this corpus has {self.n_windows}; "
                "resume with the same data and segment settings"
            )
        self.seed, self.epoch, self.cursor = state["seed"], state["epoch"], state["cursor"]
        self._order = self._permutation(self.epoch)
