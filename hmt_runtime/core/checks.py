"""Checks of values that come from users or from files: EOS ids, prompt text, tensor checksums and finiteness.

Every error names the argument (or the file and field), the value received and what was expected.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import numbers
import os
from pathlib import Path

import torch

CHECKSUM_KEY = "sha256"  # safetensors metadata: JSON {tensor name: sha256 hex of its bytes}


def check_eos_token_id(eos_token_id, vocab_size: int | None = None, name: str = "eos_token_id") -> set[int]:
    """``eos_token_id``: None, an int, or a list / tuple / set / 1-D integer tensor of ints, each in
    [0, vocab_size) -> the set of EOS ids (empty for None).  A string, a float or a bool is refused (a string
    such as "61" is not read as its characters)."""
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, torch.Tensor):
        if eos_token_id.is_floating_point() or eos_token_id.is_complex() or eos_token_id.dtype == torch.bool:
            raise TypeError(f"{name}: expected integer ids, got a tensor of dtype {eos_token_id.dtype}")
        if eos_token_id.dim() > 1:
            raise ValueError(f"{name}: expected an id or a 1-D list of ids, got shape {tuple(eos_token_id.shape)}")
        values = eos_token_id.reshape(-1).tolist()
    elif _is_int(eos_token_id):
        values = [eos_token_id]
    elif isinstance(eos_token_id, (list, tuple, set, frozenset)):
        values = list(eos_token_id)
        bad = [v for v in values if not _is_int(v)]
        if bad:
            bad = bad[0]
            raise TypeError(f"{name}={eos_token_id!r}: expected a list of integer ids, found {bad!r}")
    else:
        raise TypeError(f"{name}={eos_token_id!r}: expected None, an integer id or a list of integer ids, "
                        f"got {type(eos_token_id).__name__}")
    ids = {int(v) for v in values}
    for value in sorted(ids):
        if value < 0 or (vocab_size is not None and value >= vocab_size):
            limit = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
            raise ValueError(f"{name}={eos_token_id!r}: id {value} is outside the vocabulary {limit}")
    return ids


def check_token_ids(ids, vocab_size: int, name: str = "ids", dims: int = 1) -> torch.Tensor:
    """The one validation of token ids (the forward, ``generate``, the scheduler and the server call it): a
    non-empty integer tensor of ``dims`` dimensions (1: one prompt (S,), 2: a batch (B, S)) with every id in
    [0, vocab_size).  Returns it as int64; TypeError / ValueError messages start with ``name``."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of token ids, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
        raise TypeError(f"{name}: expected an integer tensor (torch.long), got dtype {ids.dtype}")
    if ids.dim() != dims:
        shape = "(seq_len,)" if dims == 1 else "(batch, seq_len)"
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise ValueError(f"{name}: empty prompt; expected at least one token, got shape {tuple(ids.shape)}")
    low, high = (int(v) for v in torch.aminmax(ids))
    if low < 0 or high >= vocab_size:
        raise ValueError(f"{name}: token id {low if low < 0 else high} is outside the vocabulary [0, {vocab_size})")
    return ids.long()


def check_input_ids(input_ids, vocab_size: int, name: str = "input_ids") -> torch.Tensor:
    """A batch of token ids (B, S): ``check_token_ids`` with ``dims=2``."""
    return check_token_ids(input_ids, vocab_size, name, dims=2)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_text(text, name: str = "prompt") -> str:
    """A prompt string that can be encoded as UTF-8 (refuses lone surrogates, e.g. from undecodable bytes)."""
    if not isinstance(text, str):
        raise TypeError(f"{name}: expected a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"{name}: not valid Unicode text: character {text[err.start]!r} at position {err.start} is a lone "
            "surrogate (expected UTF-8 text; undecodable input bytes produce these)"
        ) from None
    return text


# ------------------------------------------------------------------------------------------------ tensor files
def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 hex of the tensor's bytes (row-major, in its own dtype), as safetensors stores them."""
    flat = tensor.detach().contiguous().cpu().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()


def checksum_metadata(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """Metadata entry recording a checksum of every tensor (merged into a safetensors file's metadata)."""
    return {CHECKSUM_KEY: json.dumps({name: tensor_digest(t) for name, t in sorted(tensors.items())})}


def verify_checksums(path, tensors: dict[str, torch.Tensor], metadata: dict | None) -> None:
    """Compare ``tensors`` read from ``path`` with the checksums of its metadata; files written without
    checksums (older versions) pass.  Raises ValueError naming the file and the tensor."""
    recorded = (metadata or {}).get(CHECKSUM_KEY)
    if recorded is None:
        return
    try:
        sums = json.loads(recorded)
        if not isinstance(sums, dict):
            raise ValueError("not a JSON object")
    except ValueError as err:
        raise ValueError(f"{str(path)!r}: metadata field {CHECKSUM_KEY!r} is damaged ({err})") from None
    for name, tensor in tensors.items():
        if name not in sums:
            raise ValueError(f"{str(path)!r}: tensor {name!r} has no recorded checksum; the file was altered")
        if tensor_digest(tensor) != sums[name]:
            raise ValueError(f"{str(path)!r}: tensor {name!r} does not match its recorded sha256 checksum; the "
                             "file is damaged (restore it from a copy or save it again)")


def check_finite(path, name: str, tensor: torch.Tensor) -> None:
    """Refuse NaN or infinite values in a floating tensor ``name`` read from ``path``."""
    if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"{str(path)!r}: tensor {name!r} holds {bad} NaN or infinite value(s); expected finite "
                         "values (the file is damaged or was saved from a diverged model)")


def int_at_least(minimum: int):
    """argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value}: expected an integer >= {minimum}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def check_output_dir(option: str, path) -> None:
    """Refuse an output folder that is a file or lies under one, before any work starts."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise ValueError(f"{option} {str(path)!r} is a file; expected a folder")
    for parent in target.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{option} {str(path)!r}: {str(parent)!r} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ValueError(f"{option} {str(path)!r}: the folder {str(parent)!r} is not writable")
            break
