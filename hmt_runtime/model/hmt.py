"""HMTModel: the HMT parameters around a transformers causal LM, the teacher-forced forward, save/load.

The segment step (docs/spec.md "One segment") is split into pieces: ``summarize`` (step 1), ``recall_memory``
(step 2), ``segment_embeddings`` + ``run_backbone`` (step 3) and ``lm_logits`` (step 4).  ``forward`` runs them
over whole segments, with the host-side rules of ``hmt_runtime.core.segment`` (recall query, what is carried); the
scheduler (``hmt_runtime.incremental.scheduler``), the one incremental path, uses the same rules and embeddings.  The forward
is the reference every kernel, engine and the scheduler are checked against.

Over 500 lines: the forward and the checkpoint methods are one class, HMTModel.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers.utils import ModelOutput

from ..core import backbones
from ..core import replay, segment
from ..core import atomic
from ..native import quant
from . import hmt_pytorch, lean
from .loading import default_weights, load_backbone
from ..core.atomic import staged_dir
from ..core.checks import check_finite, check_input_ids, checksum_metadata, verify_checksums
from ..incremental.backend import model_ops
from ..core.config import MEMORY_READS, MEMORY_SCALES, HMTConfig
from ..core.ops import TORCH_OPS, Ops, recall_scale_factor

CONFIG_NAME = "hmt_config.json"
WEIGHTS_NAME = "hmt.safetensors"
ADAPTER_DIR = "adapter"
BACKBONE_DIR = "backbone"
FORMAT = "hmt-checkpoint"
CHECKPOINT_ENTRIES = (CONFIG_NAME, WEIGHTS_NAME, ADAPTER_DIR, BACKBONE_DIR)  # what a checkpoint folder holds
MEMORY_EPS = 1e-6  # the RMS normalisation of memory_scale="input"
MEMORY_READ_GAIN = 0.05  # the start of memory_read_gain (memory_read "sink" or "broadcast")
DEFAULT_DIR = Path(__file__).resolve().parent.parent / "weights" / "default"


class Recall(nn.Module):
    """The recall projections (spec "Extra parameters"): w_q, w_k: nn.Linear(d, d_h, bias=False)."""

    def __init__(self, width: int, recall_dim: int):
        super().__init__()
        self.w_q = nn.Linear(width, recall_dim, bias=False)
        self.w_k = nn.Linear(width, recall_dim, bias=False)


@dataclass
class HMTOutput(ModelOutput):
    """loss: scalar (with labels).  logits: (B, S, V), logits[:, t] predicts token t + 1.
    memories: (B, n_segments, d), M_n of every segment (zeros past a padded row's last segment)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    memories: torch.Tensor | None = None


def _check_labels(labels, shape, vocab_size: int) -> None:
    """labels: an integer tensor of ``shape`` with ids in [0, vocab_size) or -100 (ignored positions)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels: expected a torch.Tensor of shape {tuple(shape)}, got {type(labels).__name__}")
    if labels.shape != shape:
        raise ValueError(f"labels: expected a tensor of shape {tuple(shape)} (that of input_ids), got "
                         f"{tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels: expected an integer tensor (torch.long), got dtype {labels.dtype}")
    bad = (labels != -100) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        at = tuple(bad.nonzero()[0].tolist())
        raise ValueError(f"labels: id {int(labels[at])} at position {at} is outside the vocabulary [0, {vocab_size}); "
                         "expected token ids or -100 (ignored)")


def _check_prompt_end(prompt_end, shape, attention_mask=None):
    """prompt_end: None, an int or a (B,) integer tensor / list with values in [1, row length] -> (B,) int64."""
    if prompt_end is None:
        return None
    batch, length = shape
    if isinstance(prompt_end, bool):
        raise TypeError(f"prompt_end={prompt_end!r}: expected None, an int or {batch} ints")
    if isinstance(prompt_end, int):
        prompt_end = [prompt_end] * batch
    try:
        ends = torch.as_tensor(prompt_end)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"prompt_end: expected None, an int or {batch} ints, got {type(prompt_end).__name__}") from err
    if ends.dtype.is_floating_point or ends.dtype == torch.bool or ends.dim() != 1 or ends.shape[0] != batch:
        raise ValueError(f"prompt_end: expected {batch} integers (one per row), got shape {tuple(ends.shape)} "
                         f"of dtype {ends.dtype}")
    limits = torch.full((batch,), length) if attention_mask is None else attention_mask.long().sum(dim=1).cpu()
    bad = (ends < 1) | (ends > limits)
    if bool(bad.any()):
        row = int(bad.nonzero()[0])
        raise ValueError(f"prompt_end: {int(ends[row])} in row {row}; expected a value in [1, {int(limits[row])}] "
                         "(the number of prompt ids in that row)")
    return ends.long()


def _check_attention_mask(mask, shape) -> None:
    """attention_mask: a tensor of ``shape`` holding only 0 and 1 (bool, integer or float)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"attention_mask: expected a torch.Tensor of shape {tuple(shape)}, got {type(mask).__name__}")
    if mask.shape != shape:
        raise ValueError(f"attention_mask: expected a tensor of shape {tuple(shape)} (that of input_ids), got "
                         f"{tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        bad = (mask != 0) & (mask != 1)
        if bool(bad.any()):
            at = tuple(bad.nonzero()[0].tolist())
            raise ValueError(f"attention_mask: value {mask[at].item()!r} at position {at}; expected only 0 (padding) "
                             "and 1 (real token)")


class HMTModel(nn.Module):
    """Hierarchical Memory Transformer around ``backbone`` (any transformers causal LM).

    Attributes: ``summary_prompt`` T (1, d), ``memory_init`` M_init (1, d), ``recall.w_q`` / ``recall.w_k``
    (nn.Linear(d, d_h, bias=False)), ``memory_gain`` (1, d) with ``config.memory_scale="input"`` (else None),
    ``memory_read_gain`` (1, d) with ``config.memory_read`` "sink" or "broadcast", ``memory_read_center`` (1, d)
    with "broadcast" (else None), ``backbone``, ``config`` (HMTConfig), ``tokenizer`` (or None).
    """

    def __init__(self, backbone: nn.Module, config: HMTConfig, tokenizer=None):
        super().__init__()
        if not isinstance(config, HMTConfig):
            raise TypeError(f"config: expected an HMTConfig, got {type(config).__name__}")
        inner = backbones.unwrap(backbone)
        if not hasattr(inner, "get_input_embeddings") or not hasattr(inner, "base_model"):
            raise TypeError(f"backbone: expected a transformers causal LM, got {type(backbone).__name__}")
        backbones.check_window(inner, config)
        self.backbone = backbone
        self.config = config
        self.tokenizer = tokenizer
        width = backbones.embedding_width(inner)
        std, self.embedding_rms = backbones.embedding_moments(inner)
        table = inner.get_input_embeddings()  # its dtype and device, without dequantizing a quantized table
        reference = table.weight if isinstance(table, nn.Embedding) else next(
            t for t in list(inner.parameters()) + list(inner.buffers()) if t.is_floating_point())
        dtype, device = reference.dtype, reference.device
        self.summary_prompt = nn.Parameter(torch.randn(1, width, dtype=dtype, device=device) * std)
        self.memory_init = nn.Parameter(torch.randn(1, width, dtype=dtype, device=device) * std)
        self.recall = Recall(width, config.recall_dim).to(device=device, dtype=dtype)
        self.memory_gain = None
        self.set_memory_scale(config.memory_scale)
        self.memory_read_gain = self.memory_read_center = None
        self.set_memory_read(config.memory_read)
        # the backbone's own attention (restored for the torch ops) and the ops resolved per (device, kernels)
        self.base_attn_implementation = getattr(inner.config, "_attn_implementation", None)
        self.resolved_ops: dict[tuple[str, str], Ops] = {}
        self._replay_vocab: tuple[torch.Tensor, torch.Tensor] | None = None  # canonical ids, line breaks

    # ----------------------------------------------------------------------------------------- properties
    @property
    def width(self) -> int:
        return self.summary_prompt.shape[1]

    @property
    def recall_scale(self) -> float | None:
        """The ``scale`` argument of ``ops.recall`` for ``config.recall_scale`` (None: 1 / sqrt(d_h))."""
        return recall_scale_factor(self.config.recall_scale, self.config.recall_dim)

    @property
    def vocab_size(self) -> int:
        return backbones.vocab_size(self.backbone)

    @property
    def device(self) -> torch.device:
        return self.summary_prompt.device

    @property
    def dtype(self) -> torch.dtype:
        return self.summary_prompt.dtype

    def warm_start(self, token_id: int | None = None) -> None:
        """Set T and M_init to the embedding of ``token_id`` (default: BOS) (spec: documented warm start)."""
        if token_id is None:
            token_id = getattr(backbones.unwrap(self.backbone).config, "bos_token_id", None)
            if token_id is None:
                raise ValueError("warm_start: the backbone has no bos_token_id; pass token_id")
        with torch.no_grad():
            vector = self.embed(torch.tensor([[token_id]], device=self.device))[0]
            self.summary_prompt.copy_(vector)
            self.memory_init.copy_(vector)

    def set_memory_scale(self, memory_scale: str) -> None:
        """Switch ``config.memory_scale``; "input" gives the model a ``memory_gain`` (1, d) that starts at the RMS
        of the token embeddings (kept if it has one), "hidden" removes it."""
        if memory_scale not in MEMORY_SCALES:
            raise ValueError(f"memory_scale={memory_scale!r}: expected one of {MEMORY_SCALES}")
        self.config.memory_scale = memory_scale
        if memory_scale == "hidden":
            self.memory_gain = None
        elif self.memory_gain is None:
            self.memory_gain = nn.Parameter(torch.full((1, self.width), self.embedding_rms, dtype=self.dtype,
                                                       device=self.device))

    def set_memory_read(self, memory_read: str, gain: float | None = None) -> None:
        """Switch ``config.memory_read``; "sink" and "broadcast" give the model a ``memory_read_gain`` (1, d)
        starting at ``gain`` (default ``MEMORY_READ_GAIN``; a gain the model already has is kept unless ``gain`` is given),
        "direct" removes it; "broadcast" also gives it a ``memory_read_center`` (1, d) starting at 0 (kept if it
        has one; ``center_memory_read`` sets it from data)."""
        if memory_read not in MEMORY_READS:
            raise ValueError(f"memory_read={memory_read!r}: expected one of {MEMORY_READS}")
        if gain is not None and (isinstance(gain, bool) or not isinstance(gain, (int, float))
                                 or not math.isfinite(gain) or gain <= 0):
            raise ValueError(f"gain={gain!r}: expected a finite number > 0")
        if memory_read != "direct" and getattr(backbones.unwrap(self.backbone).config, "bos_token_id", None) is None:
            raise ValueError(f"memory_read={memory_read!r}: the backbone has no bos_token_id (the sink's embedding)")
        self.config.memory_read = memory_read
        if memory_read == "direct":
            self.memory_read_gain = None
        elif self.memory_read_gain is None or gain is not None:
            start = MEMORY_READ_GAIN if gain is None else float(gain)
            self.memory_read_gain = nn.Parameter(torch.full((1, self.width), start, dtype=self.dtype,
                                                            device=self.device))
        if memory_read != "broadcast":
            self.memory_read_center = None
        elif self.memory_read_center is None:
            self.memory_read_center = nn.Parameter(torch.zeros(1, self.width, dtype=self.dtype, device=self.device))

    def read_term(self, recalled: torch.Tensor) -> torch.Tensor:
        """What a segment adds to its inputs for its recalled P (B, d) -> (B, d): g * P ("sink"), g * (P - c)
        ("broadcast"; c = ``memory_read_center``), with g = ``memory_read_gain``."""
        if self.memory_read_center is not None:
            recalled = recalled - self.memory_read_center.to(recalled.dtype)
        return self.memory_read_gain.to(recalled.dtype) * recalled

    def memory_input(self, recalled: torch.Tensor) -> torch.Tensor:
        """What a segment's first position holds for its recalled P (B, d): P itself, or with
        ``memory_read`` "sink" or "broadcast" E(BOS) + ``read_term(P)`` (docs/spec.md)."""
        if self.memory_read_gain is None:
            return recalled
        bos = backbones.unwrap(self.backbone).config.bos_token_id
        sink = self.embed(torch.tensor([[bos]], device=recalled.device))[0].to(recalled.dtype)
        return sink + self.read_term(recalled)

    def token_embeddings(self, ids: torch.Tensor, recalled: torch.Tensor) -> torch.Tensor:
        """The inputs of a segment's sensory and segment tokens: ids (B, L), the segment's recalled P (B, d) ->
        (B, L, d): E(ids), plus ``read_term(P)`` at every position with ``memory_read="broadcast"``."""
        embeds = self.embed(ids)
        if self.config.memory_read != "broadcast":
            return embeds
        return embeds + self.read_term(recalled)[:, None, :].to(embeds.dtype)

    def memory_embedding(self, hidden: torch.Tensor) -> torch.Tensor:
        """M_n from the final hidden state at a segment's trailing P: hidden (B, d) -> (B, d) (spec step 4;
        with ``memory_scale="input"``, RMS-normalised in float32 or wider and multiplied by ``memory_gain``)."""
        if self.memory_gain is None:
            return hidden
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        h = hidden.to(dtype)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + MEMORY_EPS)
        return (h * self.memory_gain.to(dtype)).to(hidden.dtype)

    # ----------------------------------------------------------------------------------------- backend
    def prepare_ops(self) -> Ops:
        """The hot-path ops: the configured kernels (``hmt_runtime.incremental.backend.model_ops``), or torch while
        gradients are needed (the kernels are inference-only).  The first call for a device sets the backbone's
        attention implementation to the kernels' (once; later calls only look it up)."""
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            return TORCH_OPS
        return model_ops(self)

    # ----------------------------------------------------------------------------------------- segment pieces
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: (B, L) -> E(ids): (B, L, d)."""
        return backbones.unwrap(self.backbone).get_input_embeddings()(ids)

    def run_backbone(self, embeds: torch.Tensor, start: int = 0, past_key_values=None) -> torch.Tensor:
        """embeds: (B, L, d) at segment positions [start, start + L) -> final hidden states (B, L, d).

        Positions restart at 0 in every segment (spec step 3); ``past_key_values`` holds the segment's earlier
        positions (exactly ``start`` of them) when given.
        """
        positions = torch.arange(start, start + embeds.shape[1], device=embeds.device)[None].expand(embeds.shape[0], -1)
        body = backbones.decoder_body(self.backbone)
        out = body(inputs_embeds=embeds, position_ids=positions, **backbones.cache_kwargs(body, past_key_values))
        return out.last_hidden_state

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (B, L, d) -> logits (B, L, V)."""
        inner = backbones.unwrap(self.backbone)
        logits = inner.get_output_embeddings()(hidden)
        softcap = getattr(inner.config, "final_logit_softcapping", None)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    def summary_embeddings(self, query_ids: torch.Tensor) -> torch.Tensor:
        """The summary pass's input [T ; E(q) ; T]: query_ids (B, j') -> (B, j' + 2, d)."""
        prompt = self.summary_prompt.expand(query_ids.shape[0], 1, -1)
        return torch.cat([prompt, self.embed(query_ids), prompt], dim=1)

    def summarize(self, query_ids: torch.Tensor) -> torch.Tensor:
        """Spec step 1: query_ids (B, j') -> S (B, d), the final hidden state at the trailing T of [T ; E(q) ; T]."""
        return self.run_backbone(self.summary_embeddings(query_ids))[:, -1]

    def recall_memory(self, summary, memory, keys, written, ops: Ops | None = None) -> torch.Tensor:
        """Spec step 2: summary (B, d), memory (B, n, d), keys (B, n, d_h), written (B,) -> P (B, d)."""
        ops = ops or self.prepare_ops()
        return ops.recall(summary, memory, keys, written, self.recall.w_q.weight, scale=self.recall_scale)

    def replay_choice(self, query_ids: torch.Tensor, slots: list[torch.Tensor]) -> list[int]:
        """Which of ``slots`` (1-D id tensors, oldest first) the end of a prompt whose last ids are ``query_ids``
        (1-D) replays (``core.replay.choose`` with ``config.replay`` and the prompt's last ``replay_query`` ids),
        oldest first."""
        if self._replay_vocab is None:
            self._replay_vocab = (replay.canonical_ids(self.tokenizer, self.vocab_size),
                                  replay.line_breaks(self.tokenizer, self.vocab_size))
        return replay.choose(self.config.replay, query_ids[-self.config.replay_query :], slots, *self._replay_vocab)

    def segment_embeddings(self, recalled, sensory_ids, segment_ids, trailing: bool = True,
                           replay_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Spec step 3: [P ; E(replay) ; E(sensory) ; E(x) ; P] -> (B, 1 + r + k' + L + trailing, d).

        recalled: (B, d); sensory_ids: (B, k') or None; segment_ids: (B, L) (L may be 0); replay_ids: (B, r) or
        None, the replayed slots' ids (docs/spec.md "Replay at the end of a prompt").  The first position
        holds ``memory_input(P)`` (P itself unless ``memory_read`` is "sink" or "broadcast"), the tokens
        ``token_embeddings``, the trailing one P."""
        p = recalled[:, None, :]
        parts = [self.memory_input(recalled)[:, None, :]]
        if replay_ids is not None and replay_ids.shape[1]:
            parts.append(self.token_embeddings(replay_ids, recalled))
        if sensory_ids is not None and sensory_ids.shape[1]:
            parts.append(self.token_embeddings(sensory_ids, recalled))
        if segment_ids.shape[1]:
            parts.append(self.token_embeddings(segment_ids, recalled))
        if trailing:
            parts.append(p)
        return torch.cat(parts, dim=1)

    # ----------------------------------------------------------------------------------------- forward
    def iter_segments(self, input_ids: torch.Tensor, use_recall: bool = True, prompt_end=None, recall_hook=None):
        """Teacher-forced pass over ``input_ids`` (B, S), one segment at a time.

        Yields ``(start, hidden, memory)``: the segment's first token index, the final hidden states of its
        token positions (B, L, d) and its memory embedding M_n (B, d).  Gradients flow through every segment and
        the memory cache (no detach).  ``use_recall=False`` is training stage 1: segment n gets M_{n-1}.
        ``prompt_end`` (B,) int64 or None: where each row's prompt ends (``forward``); with
        ``config.prompt_recall`` the segment it falls in recalls with the prompt's last j ids.
        ``recall_hook(summary (B, d), cache (B, n, d), keys (B, n, d_h)) -> P (B, d)``: replaces the recall of
        every segment after the first (``hmt_runtime.training.diagnose`` measures variants of recall with it).
        """
        cfg = self.config
        batch, length = input_ids.shape
        ops = self.prepare_ops()
        memories: list[torch.Tensor] = []
        windows: list[torch.Tensor] = []  # each segment's window ids (sensory + segment), for replay
        sensory = tail = None
        ends = prompt_end.tolist() if (prompt_end is not None and cfg.prompt_recall) else [None] * batch
        for start in range(0, length, cfg.segment_tokens):
            tokens = input_ids[:, start : start + cfg.segment_tokens]
            replays: dict[int, torch.Tensor] = {}  # row -> the replayed slots' ids (spec "Replay at the end ...")
            if not memories:
                recalled = self.memory_init.expand(batch, -1)
            elif not use_recall:
                recalled = memories[-1]
            else:
                query, _ = segment.recall_query(cfg, tail, tokens, complete=True)
                summary = self.summarize(query)
                index = start // cfg.segment_tokens
                for row, end in enumerate(ends):  # spec "Recall at the end of a prompt"
                    if end is not None and segment.prompt_segment(cfg, end) == index:
                        own = segment.prompt_query(cfg, tail[row : row + 1], tokens[row : row + 1, : end - start])
                        summary = torch.cat([summary[:row], self.summarize(own), summary[row + 1 :]])
                        if cfg.replay:
                            slots = [w[row] for w in windows[-cfg.memory_slots :]]
                            picks = self.replay_choice(own[0], slots)
                            replays[row] = torch.cat([slots[i] for i in picks])
                cache = torch.stack(memories[-cfg.memory_slots :], dim=1)  # (B, n', d), the newest N
                keys = self.recall.w_k(cache)
                written = torch.full((batch,), cache.shape[1], dtype=torch.long, device=input_ids.device)
                if recall_hook is not None:
                    recalled = recall_hook(summary, cache, keys)
                else:
                    recalled = self.recall_memory(summary, cache, keys, written, ops)
            n_sensory = 0 if sensory is None else sensory.shape[1]
            if not replays:
                hidden = self.run_backbone(self.segment_embeddings(recalled, sensory, tokens))
                states, last = hidden[:, 1 + n_sensory : 1 + n_sensory + tokens.shape[1]], hidden[:, -1]
            else:  # rows that replay slots have longer windows: each runs alone
                states, last = [], []
                for row in range(batch):
                    pick = slice(row, row + 1)
                    extra = replays.get(row)
                    hidden = self.run_backbone(self.segment_embeddings(
                        recalled[pick], None if sensory is None else sensory[pick], tokens[pick],
                        replay_ids=None if extra is None else extra[None]))
                    first = 1 + (0 if extra is None else extra.numel()) + n_sensory
                    states.append(hidden[:, first : first + tokens.shape[1]])
                    last.append(hidden[:, -1])
                states, last = torch.cat(states), torch.cat(last)
            memory = self.memory_embedding(last)
            memories.append(memory)
            if cfg.replay:
                windows.append(tokens if sensory is None else torch.cat([sensory, tokens], dim=1))
            yield start, states, memory
            sensory, tail = segment.carried(cfg, tokens)

    def forward(self, input_ids, attention_mask=None, labels=None, use_recall: bool = True, loss_on: str = "last_segment",
                prompt_end=None):
        """input_ids: (B, S) -> HMTOutput(loss, logits (B, S, V), memories (B, n_segments, d)).

        attention_mask: (B, S) of 1 for real tokens; padding must be on the right (rows are then run at their
        own lengths; logits of padded positions are zero).  labels: (B, S) token ids (-100 = ignore); the loss
        compares logits[:, t] with labels[:, t + 1].  loss_on: "last_segment" (the spec's training loss: the
        positions of the last segment), "after_first" (every segment but the first) or "all" (every position):
        ``core.segment.loss_start``, as in training.  prompt_end: None, an int or (B,) ints in
        [1, S]: the first ``prompt_end`` ids of a row are its prompt and the rest what was generated after it;
        with ``config.prompt_recall`` this is the forward that generation from that prompt equals (spec "Recall
        at the end of a prompt"); without it, it changes nothing.
        """
        input_ids = check_input_ids(input_ids, self.vocab_size)
        segment.loss_start(self.config, loss_on, 1)  # checks the choice before any work
        if labels is not None:
            _check_labels(labels, input_ids.shape, self.vocab_size)
        if attention_mask is not None:
            _check_attention_mask(attention_mask, input_ids.shape)
        prompt_end = _check_prompt_end(prompt_end, input_ids.shape, attention_mask)
        if attention_mask is not None:
            lengths = attention_mask.long().sum(dim=1)
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
            if not torch.equal(attention_mask.long().bool(), positions < lengths[:, None]):
                raise ValueError("attention_mask: expected right padding (ones, then zeros) in every row")
            if int(lengths.min()) == 0:
                raise ValueError("attention_mask: a row has no tokens; expected at least one per row")
            if int(lengths.min()) < input_ids.shape[1]:
                return self._forward_padded(input_ids, lengths, labels, use_recall, loss_on, prompt_end)

        logits, memories = [], []
        for start, hidden, memory in self.iter_segments(input_ids, use_recall=use_recall, prompt_end=prompt_end):
            logits.append(self.lm_logits(hidden))
            memories.append(memory)
        logits = torch.cat(logits, dim=1)
        loss = None
        if labels is not None:
            loss = shifted_cross_entropy(logits, labels, segment.loss_start(self.config, loss_on, input_ids.shape[1]))
        return HMTOutput(loss=loss, logits=logits, memories=torch.stack(memories, dim=1))

    def _forward_padded(self, input_ids, lengths, labels, use_recall, loss_on, prompt_end=None):
        batch, length = input_ids.shape
        n_segments = math.ceil(length / self.config.segment_tokens)
        logits = input_ids.new_zeros((batch, length, self.vocab_size), dtype=self.dtype)
        memories = input_ids.new_zeros((batch, n_segments, self.width), dtype=self.dtype)
        losses = []
        for row in range(batch):
            n = int(lengths[row])
            out = self.forward(
                input_ids[row : row + 1, :n],
                labels=None if labels is None else labels[row : row + 1, :n],
                use_recall=use_recall,
                loss_on=loss_on,
                prompt_end=None if prompt_end is None else prompt_end[row : row + 1],
            )
            logits[row, :n] = out.logits[0]
            memories[row, : out.memories.shape[1]] = out.memories[0]
            if out.loss is not None and not torch.isnan(out.loss):
                losses.append(out.loss)
        loss = torch.stack(losses).mean() if losses else None
        return HMTOutput(loss=loss, logits=logits, memories=memories)

    # ----------------------------------------------------------------------------------------- generation
    def generate(self, input_ids, max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, eos_token_id=None, streamer=None,
                 state=None, return_state: bool = False, progress: bool = False):
        """Continue ``input_ids`` (B, S); returns (B, S + new) ids like transformers' generate (rows that stop
        early at an EOS id are padded with the smallest EOS id).

        A transformers-style face of ``hmt_runtime.generate`` (the scheduler: same tokens, same speed).
        Unbounded: memory is written at every segment boundary and the KV cache never exceeds W positions.
        ``streamer`` (batch 1): ``put`` gets the prompt, then each new token; ``end`` at the end.  ``state`` (a
        MemoryState from ``hmt_runtime.ingest``: 1 row, or one per row of ``input_ids``) continues after an
        ingested document (``input_ids`` then holds only the new tokens); it is checked against this model's
        config and never modified.  ``return_state=True`` returns ``(ids, new_state)``: the state after the prompt
        and every new token but a final EOS.
        """
        from ..incremental.generation import generate_ids  # the model knows the segment step, not the scheduler

        return generate_ids(self, input_ids, max_new_tokens=max_new_tokens, do_sample=do_sample,
                            temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
                            streamer=streamer, state=state, return_state=return_state, progress=progress)

    # ----------------------------------------------------------------------------------------- checkpoints
    def _hmt_named_parameters(self) -> dict[str, nn.Parameter]:
        """The HMT parameters by checkpoint name: T, M_init, W_q, W_k and the gains the config asks for."""
        named = {"summary_prompt": self.summary_prompt, "memory_init": self.memory_init,
                 "recall.w_q.weight": self.recall.w_q.weight, "recall.w_k.weight": self.recall.w_k.weight,
                 "memory_gain": self.memory_gain, "memory_read_gain": self.memory_read_gain,
                 "memory_read_center": self.memory_read_center}
        return {name: param for name, param in named.items() if param is not None}

    def hmt_parameters(self) -> list[nn.Parameter]:
        """The HMT parameters: what ``hmt_state_dict`` saves."""
        return list(self._hmt_named_parameters().values())

    def hmt_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: param.detach() for name, param in self._hmt_named_parameters().items()}

    def backbone_identity(self) -> dict:
        inner = backbones.unwrap(self.backbone)
        return {
            "source": getattr(self.backbone, "hmt_source", None) or getattr(inner, "hmt_source", None),
            "model_type": getattr(inner.config, "model_type", None),
            "width": self.width,
            "vocab_size": self.vocab_size,
        }

    def save_pretrained(self, save_directory, save_backbone: bool = False) -> None:
        """Write ``hmt.safetensors`` (T, M_init, W_q, W_k, with a sha256 checksum of each in its metadata),
        ``hmt_config.json`` (HMT config, recall mode, backbone identity), the LoRA adapter if the backbone is a
        peft model, and with ``save_backbone`` the whole backbone and tokenizer.

        The folder is written beside the target and renamed into place (``hmt_runtime.core.atomic``): a failed or
        killed save leaves the previous checkpoint loadable.  A target folder holding files that are not a
        checkpoint's is refused (FileExistsError naming them; nothing is deleted), as is a target that is a file.
        Parameters holding NaN or infinity are refused (ValueError) so that they never replace a good checkpoint.
        """
        if not isinstance(save_backbone, bool):
            raise TypeError(f"save_backbone={save_backbone!r}: expected True or False")
        if save_backbone and isinstance(backbones.unwrap(self.backbone), lean.LlamaForCausalLM):
            raise ValueError("save_pretrained(save_backbone=True): the backbone is the lean q4 model (the default "
                             "backbone's GGUF blocks); load the model with weights='fp32' to save a transformers copy")
        tensors = {k: v.contiguous().cpu() for k, v in self.hmt_state_dict().items()}
        for name, value in tensors.items():
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"save_pretrained: parameter {name!r} holds NaN or infinite values; a diverged "
                                 "model is not saved (an existing checkpoint is left as it was)")
        with staged_dir(save_directory, owned=CHECKPOINT_ENTRIES, what="save_directory") as tmp:
            save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": FORMAT, **checksum_metadata(tensors)})
            identity = self.backbone_identity()
            meta = {"format": FORMAT, "version": 1, "hmt": self.config.to_dict(), "backbone": identity,
                    "dtype": str(self.dtype).replace("torch.", "")}
            if hasattr(self.backbone, "peft_config") or getattr(self.backbone, "lora_config", None) is not None:
                if hasattr(self.backbone, "peft_config"):
                    self.backbone.save_pretrained(tmp / ADAPTER_DIR)
                else:  # the lean model's adapter (hmt_runtime.model.lean), in peft's files
                    self.backbone.save_adapter(tmp / ADAPTER_DIR)
                _record_adapter_base(tmp / ADAPTER_DIR, identity.get("source"))
                meta["adapter"] = ADAPTER_DIR
            if save_backbone:
                backbones.unwrap(self.backbone).save_pretrained(tmp / BACKBONE_DIR)
                if self.tokenizer is not None:
                    self.tokenizer.save_pretrained(tmp / BACKBONE_DIR)
                meta["backbone_dir"] = BACKBONE_DIR
            (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2))

    @staticmethod
    def read_checkpoint_config(directory) -> dict:
        """The validated ``hmt_config.json`` of a checkpoint folder (an interrupted save there is recovered
        first).  Raises FileNotFoundError when it is missing, ValueError naming the file and field when damaged."""
        directory = atomic.recover(_checkpoint_path(directory))
        path = directory / CONFIG_NAME
        if not path.is_file():
            what = "does not exist" if not directory.exists() else f"{CONFIG_NAME} is missing"
            raise FileNotFoundError(f"{str(directory)!r} is not an HMT checkpoint: {what}")
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{str(path)!r} is not an HMT checkpoint config: {err}") from err
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"{str(path)!r} is not an HMT checkpoint config (format field missing or wrong; "
                             f"expected \"format\": {FORMAT!r})")
        version = meta.get("version", 1)
        if isinstance(version, bool) or not isinstance(version, int) or version > 1 or version < 1:
            raise ValueError(f"{str(path)!r}: field \"version\" is {version!r}; expected 1 (a newer version of this "
                             "package writes other versions)")
        if not isinstance(meta.get("hmt"), dict):
            found = "missing" if "hmt" not in meta else f"a {type(meta['hmt']).__name__}"
            raise ValueError(f"{str(path)!r}: field \"hmt\" (the HMT config) is {found}; expected an object with "
                             f"the HMTConfig fields")
        identity = meta.get("backbone", {})
        if not isinstance(identity, dict):
            raise ValueError(f"{str(path)!r}: field \"backbone\" is a {type(identity).__name__}; expected an object")
        for key in ("width", "vocab_size"):
            value = identity.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{str(path)!r}: field \"backbone.{key}\" is {value!r}; expected an integer >= 1")
        if identity.get("source") is not None and not isinstance(identity["source"], str):
            raise ValueError(f"{str(path)!r}: field \"backbone.source\" is {identity['source']!r}; expected a string")
        for key in ("adapter", "backbone_dir"):
            value = meta.get(key)
            if value is None:
                continue
            if not isinstance(value, str) or not value or Path(value).name != value or value in (".", ".."):
                raise ValueError(f"{str(path)!r}: field \"{key}\" is {value!r}; expected the name of a folder "
                                 "inside the checkpoint")
            if not (directory / value).is_dir():
                raise FileNotFoundError(f"{str(directory)!r}: the folder {value!r} named by field \"{key}\" of "
                                        f"{CONFIG_NAME} is missing")
        return meta

    def load_hmt_weights(self, directory) -> None:
        """Load T, M_init, W_q, W_k from ``directory/hmt.safetensors``: names, shapes, finite values and (when
        recorded) the sha256 checksum of each tensor are checked; errors name the file and the tensor."""
        directory = atomic.recover(_checkpoint_path(directory))
        path = directory / WEIGHTS_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{str(directory)!r} is not an HMT checkpoint: {WEIGHTS_NAME} is missing")
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                metadata = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except Exception as err:  # safetensors raises several error types for a damaged file
            raise ValueError(f"{str(path)!r} is not a readable safetensors file: {err}") from err
        expected = self.hmt_state_dict()
        if set(tensors) != set(expected):
            raise ValueError(f"{str(path)!r} holds tensors {sorted(tensors)}; expected {sorted(expected)}")
        for name, value in tensors.items():
            if not value.is_floating_point():
                raise ValueError(f"{str(path)!r}: tensor {name!r} has dtype {value.dtype}; expected a floating dtype")
            if value.shape != expected[name].shape:
                raise ValueError(
                    f"{str(path)!r}: tensor {name!r} has shape {tuple(value.shape)} but this model needs "
                    f"{tuple(expected[name].shape)}: the checkpoint was made for another backbone width or recall_dim"
                )
        verify_checksums(path, tensors, metadata)
        for name, value in tensors.items():
            check_finite(path, name, value)
        with torch.no_grad():
            for name, value in tensors.items():
                expected[name].copy_(value)

    @classmethod
    def from_hmt_pytorch(cls, checkpoint, backbone, **kwargs) -> "HMTModel":
        """A model trained with the paper's code (HMT-pytorch): its ``state_dict`` file (``module.`` prefix or
        not, LoRA or not) or the output of DeepSpeed's ``zero_to_fp32.py``, on ``backbone`` (a transformers model
        folder or "smollm2-135m": its config and tokenizer).  Keyword arguments: ``window``, ``sensory_tokens``,
        ``recall_dim`` (required), ``memory_slots``, ``sum_fraction``, ``recall_scale``, ``lora_alpha``, ``dtype``,
        ``kernels``; see ``hmt_runtime.model.hmt_pytorch.read_hmt_pytorch`` and docs/hmt_pytorch.md.  LoRA adapters are
        merged into the backbone; ``save_pretrained(..., save_backbone=True)`` keeps the result."""
        parts = hmt_pytorch.read_hmt_pytorch(checkpoint, backbone, **kwargs)
        model = cls(parts.backbone, parts.config, tokenizer=parts.tokenizer)
        with torch.no_grad():
            params = dict(model.named_parameters())
            for name, tensor in parts.parameters.items():
                params[name].copy_(tensor.to(model.dtype))
        model.eval()
        model.hmt_conversion = {**parts.info, "dtype": str(model.dtype).replace("torch.", "")}
        return model

    @classmethod
    def from_pretrained(cls, name_or_path="default", backbone=None, tokenizer=None, kernels: str | None = None,
                        dtype: torch.dtype | None = None, weights: str | None = None, replay: int | None = None):
        """Load a checkpoint written by ``save_pretrained``; "default" is the trained HMT shipped for
        SmolLM2-135M.  Without ``backbone``, the backbone recorded in the checkpoint is loaded (offline).

        Everything read is validated (``read_checkpoint_config``, ``load_hmt_weights``; the adapter's weights
        must be finite); a save interrupted between its renames is recovered first (``hmt_runtime.core.atomic``).
        ``weights`` ("fp32", "bf16", "int8", "q4"): the storage of the backbone's linear weights (``load_backbone``;
        a given ``backbone`` is converted in place); LoRA adapters are applied beside the quantized weights.  None
        (the default): ``loading.default_weights`` of the recorded backbone, i.e. "q4" for the default backbone
        (its GGUF blocks as stored: lossless, and on CPU the fast path; pass "fp32" to train or to run on a GPU)
        and "fp32" for others; a given ``backbone`` is left as it is.  ``replay``: slots replayed at the end of a
        prompt (docs/spec.md "Replay at the end of a prompt"); None keeps the checkpoint's, 0 turns it off, a
        value > 0 turns ``prompt_recall`` on with it.
        """
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype={dtype!r}: expected None or a torch.dtype (e.g. torch.bfloat16)")
        if kernels is not None and not isinstance(kernels, str):
            raise TypeError(f"kernels={kernels!r}: expected None or one of 'auto', 'torch', 'triton', 'native'")
        if name_or_path == "default":
            directory = DEFAULT_DIR
            if not (directory / CONFIG_NAME).is_file():
                raise FileNotFoundError("the default HMT weights are not installed with this package")
        else:
            directory = atomic.recover(_checkpoint_path(name_or_path, "name_or_path"))
        meta = cls.read_checkpoint_config(directory)
        try:
            config = HMTConfig.from_dict(meta["hmt"])
        except (TypeError, ValueError) as err:
            raise ValueError(f"{str(directory / CONFIG_NAME)!r}: field \"hmt\": {err}") from None
        if kernels is not None:
            config.kernels = kernels
            config.__post_init__()
        if replay is not None:
            config.set_replay(replay)
        identity = meta.get("backbone", {})
        if backbone is None:
            if meta.get("backbone_dir"):
                backbone, tokenizer = load_backbone(str(directory / meta["backbone_dir"]),
                                                              weights=weights or "fp32")
            elif identity.get("source"):
                backbone, tokenizer = load_backbone(identity["source"],
                                                    weights=weights or default_weights(identity["source"]))
            else:
                raise ValueError(f"checkpoint {str(directory)!r} records no backbone source; pass backbone=")
            if dtype is not None:
                backbone = backbone.to(dtype)
        elif weights not in (None, "fp32"):
            quant.quantize_model(backbone, weights)
        width = backbones.embedding_width(backbone)
        if identity.get("width") is not None and identity["width"] != width:
            raise ValueError(
                f"checkpoint {str(directory)!r} was made for a backbone of width {identity['width']} "
                f"({identity.get('model_type')}, {identity.get('source')}); this backbone's width is {width}"
            )
        if meta.get("adapter"):
            source = getattr(backbone, "hmt_source", None)
            adapter = directory / meta["adapter"]
            try:
                if isinstance(backbone, lean.LlamaForCausalLM):
                    backbone = lean.attach_adapter(backbone, adapter)  # no peft import
                else:
                    backbone = quant.load_adapter(backbone, adapter)  # peft; also over QuantLinear layers
            except Exception as err:  # peft and safetensors raise many error types for a damaged adapter
                raise ValueError(f"{str(adapter)!r}: the LoRA adapter cannot be loaded ({type(err).__name__}: "
                                 f"{err})") from err
            for name, param in backbone.named_parameters():
                if "lora_" in name:
                    check_finite(adapter, name, param.detach())
            backbone.hmt_source = source
        model = cls(backbone, config, tokenizer=tokenizer)
        model.load_hmt_weights(directory)
        model.eval()
        return model


def _checkpoint_path(value, name: str = "directory") -> Path:
    """A checkpoint folder argument as a Path; clear errors for None, other types and an empty string."""
    if isinstance(value, Path):
        return value
    return Path(atomic.path_text(value, name, "'default' or a checkpoint folder path"))


def _record_adapter_base(adapter_dir: Path, source: str | None) -> None:
    """peft records the base model's local folder; record the backbone's portable identity instead."""
    path = adapter_dir / "adapter_config.json"
    if source is None or not path.is_file():
        return
    data = json.loads(path.read_text())
    data["base_model_name_or_path"] = source
    path.write_text(json.dumps(data, indent=2))


def shifted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, first: int = 0) -> torch.Tensor:
    """Mean CE of logits[:, t] against labels[:, t + 1] for t in [first, S - 1); -100 labels are ignored."""
    pred = logits[:, first:-1]
    target = labels[:, first + 1 :]
    if pred.dtype in (torch.float16, torch.bfloat16):
        pred = pred.float()
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), ignore_index=-100)
