"""The generation scheduler: HMT over preallocated, fixed-size state (spec "Generation").

Rows
    A ``Scheduler`` holds ``rows`` sequences.  Each row has its own memory (a row of a ``MemoryState``), its own
    segment boundaries and its own slice of the static KV cache; no row reads another row's state, and an error
    while one row is being worked on leaves the other rows untouched (the failing row is freed).

Static state (allocated when the scheduler is built, never resized)
    kv.keys[l], kv.values[l]: (rows, Hkv, W, D) per layer; kv.lens: (rows,) int64 on the device, the positions of
    the current segment each row holds (``kv.host_lens`` mirrors it, so control flow never reads the device).
    state: ``MemoryState`` of ``rows`` sequences: ring buffers (rows, N, d) with cached keys (rows, N, d_h),
    sensory / segment / tail ids, the recalled P of the current segment.
    logits: (rows, V), the next-token logits of every row.

One decode step and the events around it
    decode   one token for every live row at once: row b writes its key/value at position ``lens[b]`` and
             attends to positions [0, lens[b]] (a per-row mask).  No host sync inside the step; on CUDA the step
             is captured as a CUDA graph per batch bucket and replayed.
    start    (per row) summary pass + recall -> P; empty the row's KV; prefill [P ; E(sensory)].  In causal mode
             it runs right after ``close`` (its query is the tail of the closed segment); in paper mode it waits
             for the segment's first token (a provisional query, spec "Generation").
    refresh  (paper mode, per row) when the segment reaches j tokens: the true P from its first j tokens, and a
             re-prefill of [P ; E(sensory) ; E(x_0 .. x_{j-1})].
    close    (per row) at Ls tokens: feed the trailing P, write M_n to the ring buffer, carry the sensory ids and
             the tail to the next segment.

Two engines run the backbone over this state.  ``LlamaEngine`` is a lean forward of Llama-family decoders
(Llama / SmolLM2, Mistral, Qwen2: the backbone's own weights, no copies) with the batched decode step;
``HFEngine`` runs any other transformers backbone through its own forward with a ``Cache`` over the static
buffers, one row at a time.  Both produce the same tokens as ``HMTModel.generate`` (the reference path of
``segment.py``); the tests check it.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin

from . import backbones
from .memory import MemoryState
from .model import HMTModel

LLAMA_FAMILY = ("llama", "mistral", "qwen2")
GRAPH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


# ---------------------------------------------------------------------------------------------------- static KV
class StaticKV:
    """Per-layer key/value buffers of ``rows`` sequences and ``window`` positions.

    keys[l], values[l]: (rows, Hkv, W, D), allocated at construction (``shape`` given) or at the first write of
    layer l (``ensure``).  lens: (rows,) int64 on the device, positions held per row; host_lens: the same, as
    Python ints.
    """

    def __init__(self, n_layers: int, rows: int, window: int, device, dtype, shape: tuple[int, int] | None = None):
        self.n_layers, self.rows, self.window = n_layers, rows, window
        self.device, self.dtype = torch.device(device), dtype
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self.lens = torch.zeros(rows, dtype=torch.long, device=device)
        self.host_lens = [0] * rows
        if shape is not None:
            for layer in range(n_layers):
                self._allocate(layer, *shape, shape[1])

    def _allocate(self, layer: int, kv_heads: int, head_dim: int, value_dim: int) -> None:
        size = (self.rows, kv_heads, self.window)
        self.keys[layer] = torch.zeros(*size, head_dim, dtype=self.dtype, device=self.device)
        self.values[layer] = torch.zeros(*size, value_dim, dtype=self.dtype, device=self.device)

    def ensure(self, layer: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Allocate layer ``layer`` for states shaped like key_states (B, Hkv, L, D) if not done yet."""
        if self.keys[layer] is None:
            self._allocate(layer, key_states.shape[1], key_states.shape[-1], value_states.shape[-1])

    def set_len(self, row: int, length: int) -> None:
        """Host and device length of ``row`` (the device write is a fill, no sync)."""
        if not 0 <= length <= self.window:
            raise ValueError(f"row {row}: KV length {length} outside [0, {self.window}]")
        self.host_lens[row] = length
        self.lens[row] = length

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)


# ---------------------------------------------------------------------------------------------------- engines
def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm: the variance in float32, the product in the input dtype.  For float32 inputs the fused
    ``F.rms_norm`` (one op instead of six; bitwise equal on CPU), else transformers' ops one by one."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    dtype = x.dtype
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """RoPE: x * cos + rotate_half(x) * sin, written as x * cos + x[..., perm] * sin_signed with perm swapping
    the halves and sin_signed = [-sin_1 ; sin_2] (the same products, so bitwise what transformers computes).
    x: (B, L, H, D); cos/sin_signed: (B, L, 1, D); perm: (D,)."""
    return x * cos + x.index_select(-1, perm) * sin_signed


@dataclass
class _LayerWeights:
    ln_in: torch.Tensor
    eps_in: float
    wq: torch.Tensor
    bq: torch.Tensor | None
    wk: torch.Tensor
    bk: torch.Tensor | None
    wv: torch.Tensor
    bv: torch.Tensor | None
    wo: torch.Tensor
    bo: torch.Tensor | None
    ln_post: torch.Tensor
    eps_post: float
    wg: torch.Tensor
    bg: torch.Tensor | None
    wu: torch.Tensor
    bu: torch.Tensor | None
    wd: torch.Tensor
    bd: torch.Tensor | None


def _sliding_window_below(config, window: int) -> bool:
    sliding = getattr(config, "sliding_window", None)
    if sliding is None:
        return False
    types = getattr(config, "layer_types", None)
    if types is not None and "sliding_attention" not in types:
        return False
    if getattr(config, "use_sliding_window", True) is False:
        return False
    return sliding < window


def lean_unsupported_reason(backbone: nn.Module, window: int) -> str | None:
    """Why ``LlamaEngine`` cannot run ``backbone`` exactly (None when it can)."""
    if hasattr(backbone, "get_base_model") or hasattr(backbone, "peft_config"):
        return "the backbone is a peft model (adapters run through transformers)"
    config = getattr(backbone, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in LLAMA_FAMILY:
        return f"model_type {model_type!r} is not one of {LLAMA_FAMILY}"
    if getattr(config, "hidden_act", None) != "silu":
        return f"hidden_act {getattr(config, 'hidden_act', None)!r} is not 'silu'"
    if _sliding_window_below(config, window):
        return f"sliding_window {config.sliding_window} is shorter than the HMT window {window}"
    body = backbones.decoder_body(backbone)
    if not hasattr(body, "layers") or not hasattr(body, "rotary_emb") or not hasattr(body, "norm"):
        return "the decoder body has no layers / rotary_emb / norm"
    for layer in body.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None:
            return "a layer has no self_attn / mlp"
        for module in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            if type(module) is not nn.Linear:
                return f"a projection is a {type(module).__name__}, not a plain nn.Linear"
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if not hasattr(norm, "variance_epsilon") or set(vars(norm).get("_parameters", {})) != {"weight"}:
                return f"a norm is a {type(norm).__name__} of unexpected form"
        if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
            return "the attention normalises q/k (not a Llama-family layer)"
        if getattr(attn, "sliding_window", None) is not None and attn.sliding_window < window:
            return "a layer uses a sliding window shorter than the HMT window"
    return None


class LlamaEngine:
    """A lean forward of a Llama-family decoder over ``StaticKV`` (weights are the backbone's own tensors).

    Same math as transformers' Llama / Mistral / Qwen2 layers, op for op, without the per-call machinery
    (masks, cache objects, module hooks).  Attention: the backend's ``attention_with_kvcache`` when it is not
    the torch reference (Triton / native: the fused append + attention), else sdpa over views of the buffers.

    All methods take input embeddings and return final (post-norm) hidden states; none allocates KV memory.
    """

    name = "lean"

    def __init__(self, backbone: nn.Module, kv_rows: int, window: int, ops=None):
        inner = backbones.unwrap(backbone)
        body = backbones.decoder_body(backbone)
        config = inner.config
        self.n_layers = config.num_hidden_layers
        self.q_heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.q_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.q_heads
        self.group = self.q_heads // self.kv_heads
        weight = body.norm.weight
        self.dtype, self.device = weight.dtype, weight.device
        self.window = window
        self.layers = []
        for layer in body.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(_LayerWeights(
                layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon,
                attn.q_proj.weight, attn.q_proj.bias, attn.k_proj.weight, attn.k_proj.bias,
                attn.v_proj.weight, attn.v_proj.bias, attn.o_proj.weight, attn.o_proj.bias,
                layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon,
                mlp.gate_proj.weight, mlp.gate_proj.bias, mlp.up_proj.weight, mlp.up_proj.bias,
                mlp.down_proj.weight, mlp.down_proj.bias,
            ))
        self.scale = float(getattr(body.layers[0].self_attn, "scaling", self.head_dim ** -0.5))
        self.norm_weight, self.norm_eps = body.norm.weight, body.norm.variance_epsilon
        with torch.no_grad():
            probe = torch.zeros(1, dtype=self.dtype, device=self.device)
            cos, sin = body.rotary_emb(probe, torch.arange(window, device=self.device)[None])
        half = self.head_dim // 2
        self.cos = cos[0].contiguous()  # (W, D): the positions of one segment
        self.sin = torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1).contiguous()  # signed, see _rotate
        self.perm = torch.cat([torch.arange(half, self.head_dim), torch.arange(half)]).to(self.device)
        self.kv = StaticKV(self.n_layers, kv_rows, window, self.device, self.dtype, (self.kv_heads, self.head_dim))
        self.positions = torch.arange(window, device=self.device)  # (W,)
        self.row_index = torch.arange(kv_rows, device=self.device)  # (rows,)
        self.fused = ops.attention_with_kvcache if ops is not None and ops.name != "torch" else None

    # -------------------------------------------------------------------------------------------- the layers
    def _layers(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Callable) -> torch.Tensor:
        """x: (B, L, d); cos/sin: (B, L, 1, D) (sin signed, see _rotate); attend(layer, q (B, L, Hq, D), k, v (B, L, Hkv, D)) -> (B, L, Hq, D)."""
        batch, length = x.shape[:2]
        for index, w in enumerate(self.layers):
            h = _rms_norm(x, w.ln_in, w.eps_in)
            q = _rotate(F.linear(h, w.wq, w.bq).view(batch, length, self.q_heads, self.head_dim), cos, sin, self.perm)
            k = _rotate(F.linear(h, w.wk, w.bk).view(batch, length, self.kv_heads, self.head_dim), cos, sin, self.perm)
            v = F.linear(h, w.wv, w.bv).view(batch, length, self.kv_heads, self.head_dim)
            out = attend(index, q, k, v)
            x = x + F.linear(out.reshape(batch, length, self.q_heads * self.head_dim), w.wo, w.bo)
            h = _rms_norm(x, w.ln_post, w.eps_post)
            x = x + F.linear(F.silu(F.linear(h, w.wg, w.bg)) * F.linear(h, w.wu, w.bu), w.wd, w.bd)
        return _rms_norm(x, self.norm_weight, self.norm_eps)

    def _sdpa(self, q, keys, values, mask=None, causal=False):
        """q: (B, L, Hq, D); keys/values: (B, Hkv, S, D) -> (B, L, Hq, D)."""
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask, is_causal=causal,
                                             scale=self.scale, enable_gqa=self.group > 1)
        return out.transpose(1, 2)

    # -------------------------------------------------------------------------------------------- entry points
    def encode(self, embeds: torch.Tensor) -> torch.Tensor:
        """A pass without cache (the summary pass): embeds (B, L, d) at positions [0, L) -> hidden (B, L, d)."""
        length = embeds.shape[1]
        cos, sin = self.cos[None, :length, None], self.sin[None, :length, None]

        def attend(_, q, k, v):
            return self._sdpa(q, k.transpose(1, 2), v.transpose(1, 2), causal=True)

        return self._layers(embeds, cos, sin, attend)

    def prefill(self, row: int, embeds: torch.Tensor, start: int) -> torch.Tensor:
        """Row ``row``: embeds (1, L, d) at segment positions [start, start + L), appended to the row's cache
        (which must hold exactly ``start`` positions) -> hidden (1, L, d).  Sets the row's length to start + L."""
        length = embeds.shape[1]
        end = start + length
        if end > self.window:
            raise ValueError(f"row {row}: {start} + {length} positions exceed the window {self.window}")
        kv = self.kv
        cos, sin = self.cos[None, start:end, None], self.sin[None, start:end, None]
        if self.fused is not None:
            lens = kv.lens[row : row + 1]

            def attend(i, q, k, v):
                return self.fused(q, k, v, kv.keys[i][row : row + 1], kv.values[i][row : row + 1], lens, scale=self.scale)
        else:
            mask = None
            if start:  # bottom-right causal: query i sees positions <= start + i
                mask = self.positions[None, :end] <= (start + self.positions[:length])[:, None]

            def attend(i, q, k, v):
                keys, values = kv.keys[i][row], kv.values[i][row]  # (Hkv, W, D)
                keys[:, start:end] = k[0].transpose(0, 1)
                values[:, start:end] = v[0].transpose(0, 1)
                return self._sdpa(q, keys[None, :, :end], values[None, :, :end], mask=mask, causal=not start)

        hidden = self._layers(embeds, cos, sin, attend)
        kv.set_len(row, end)
        return hidden

    def decode(self, embeds: torch.Tensor, live: torch.Tensor, span: int | None = None) -> torch.Tensor:
        """One position for rows [0, B): embeds (B, 1, d); row b at position ``kv.lens[b]``; live: (B,) int64,
        1 for rows whose length advances (other rows are scratch: they write at their position and are ignored).

        span: cache positions attended to (host-known ``max(lens) + 1``; the window W when captured in a CUDA
        graph).  Returns hidden (B, 1, d).  Device-only: no host sync, no host-side bookkeeping (``commit``)."""
        batch = embeds.shape[0]
        kv = self.kv
        lens = kv.lens[:batch]
        masked = batch > 1 or span is None  # batch 1 at span = lens + 1 sees every position it attends to
        span = self.window if span is None else span
        cos, sin = self.cos[lens][:, None, None], self.sin[lens][:, None, None]  # (B, 1, 1, D)
        if self.fused is not None:
            def attend(i, q, k, v):
                return self.fused(q, k, v, kv.keys[i][:batch], kv.values[i][:batch], lens, scale=self.scale)
        else:
            rows = self.row_index[:batch]
            mask = None
            if masked:
                mask = (self.positions[None, :span] <= lens[:, None])[:, None, None]  # (B, 1, 1, span)

            def attend(i, q, k, v):
                keys, values = kv.keys[i], kv.values[i]
                keys[rows, :, lens] = k[:, 0]
                values[rows, :, lens] = v[:, 0]
                # the G query heads of a kv head attend as G query rows: no key expansion
                grouped = q.view(batch, self.kv_heads, self.group, self.head_dim)
                out = F.scaled_dot_product_attention(grouped, keys[:batch, :, :span], values[:batch, :, :span],
                                                     attn_mask=mask, scale=self.scale)
                return out.view(batch, 1, self.q_heads, self.head_dim)

        hidden = self._layers(embeds, cos, sin, attend)
        lens += live
        return hidden

    def commit(self, live_rows: Iterable[int]) -> None:
        """Host-side bookkeeping after ``decode``: the live rows' lengths advanced by one."""
        for row in live_rows:
            self.kv.host_lens[row] += 1


class _RowLayer(CacheLayerMixin):
    """One layer of ``_RowCache``: appends into row ``row`` of the static buffers, returns views of them."""

    is_sliding = False
    is_compileable = False

    def __init__(self, kv: StaticKV, layer: int, row: int, start: int):
        super().__init__()
        self.kv, self.layer, self.row, self.length = kv, layer, row, start

    def lazy_initialization(self, key_states, value_states) -> None:
        self.kv.ensure(self.layer, key_states, value_states)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.kv.window:
            raise ValueError(f"row {self.row}: {end} positions exceed the window {self.kv.window}")
        keys, values = self.kv.keys[self.layer][self.row], self.kv.values[self.layer][self.row]
        keys[:, self.length : end] = key_states[0]
        values[:, self.length : end] = value_states[0]
        self.length = end
        return keys[None, :, :end], values[None, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.kv.window

    def reset(self) -> None:
        self.length = 0


class _RowCache(Cache):
    """A transformers ``Cache`` over one row of ``StaticKV``, holding ``start`` positions."""

    def __init__(self, kv: StaticKV, row: int, start: int):
        super().__init__(layers=[_RowLayer(kv, layer, row, start) for layer in range(kv.n_layers)])


class HFEngine:
    """Any transformers backbone through its own forward (``HMTModel.run_backbone``), one row at a time, with a
    ``Cache`` whose storage is the static buffers.  Same entry points as ``LlamaEngine``."""

    name = "transformers"

    def __init__(self, model: HMTModel, kv_rows: int, window: int):
        self.model = model
        config = backbones.unwrap(model.backbone).config
        n_layers = config.get_text_config(decoder=True).num_hidden_layers if hasattr(config, "get_text_config") \
            else config.num_hidden_layers
        self.window = window
        self.kv = StaticKV(n_layers, kv_rows, window, model.device, model.dtype)

    def encode(self, embeds):
        return self.model.run_backbone(embeds)

    def prefill(self, row, embeds, start):
        end = start + embeds.shape[1]
        if end > self.window:
            raise ValueError(f"row {row}: {start} + {embeds.shape[1]} positions exceed the window {self.window}")
        hidden = self.model.run_backbone(embeds, start, _RowCache(self.kv, row, start))
        self.kv.set_len(row, end)
        return hidden

    def decode(self, embeds, live, span=None, live_rows=()):
        hidden = torch.zeros_like(embeds)
        for row in live_rows:
            start = self.kv.host_lens[row]
            hidden[row : row + 1] = self.model.run_backbone(embeds[row : row + 1], start, _RowCache(self.kv, row, start))
        self.kv.lens[: embeds.shape[0]] += live
        return hidden

    def commit(self, live_rows):
        for row in live_rows:
            self.kv.host_lens[row] += 1


def make_engine(model: HMTModel, rows: int, engine: str = "auto", ops=None):
    """``engine``: "auto" (lean when the backbone allows it), "lean" (fail when it does not) or "transformers"."""
    if engine not in ("auto", "lean", "transformers"):
        raise ValueError(f"engine={engine!r}: expected 'auto', 'lean' or 'transformers'")
    window = model.config.window
    if engine == "transformers":
        return HFEngine(model, rows, window)
    reason = lean_unsupported_reason(model.backbone, window)
    if reason is None:
        return LlamaEngine(model.backbone, rows, window, ops)
    if engine == "lean":
        raise ValueError(f"engine='lean': {reason}")
    return HFEngine(model, rows, window)


# ---------------------------------------------------------------------------------------------------- CUDA graphs
class _Graphs:
    """CUDA graphs of fixed-shape steps, captured on their third call (two eager warm-up calls first).

    A captured function reads only static tensors (its inputs are copied into a static buffer first) and does
    no host-side work; replaying it redoes exactly what the eager call did.
    """

    def __init__(self):
        self.graphs: dict = {}
        self.calls: dict = {}
        self.failed: set = set()
        self.pool = None

    def run(self, key, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key in self.graphs:
            graph, out = self.graphs[key]
            graph.replay()
            return out
        calls = self.calls.get(key, 0)
        self.calls[key] = calls + 1
        if calls < 2:  # warm-up, on a side stream as capture requires
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                out = fn()
            torch.cuda.current_stream().wait_stream(stream)
            return out
        if key in self.failed:
            return fn()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                out = fn()
        except Exception as err:  # e.g. an op that reads the device during capture: stay eager for this step
            self.failed.add(key)
            warnings.warn(f"hmt: CUDA graph capture of {key[0]!r} failed ({err}); running it eagerly", stacklevel=3)
            return fn()
        self.pool = graph.pool()
        self.graphs[key] = (graph, out)
        graph.replay()  # capture records without running: run it now
        return out


# ---------------------------------------------------------------------------------------------------- scheduler
@dataclass
class _Host:
    """Host mirror of one row's control state (so boundaries never need a device read)."""

    live: bool = False
    started: bool = False
    provisional: bool = False
    written: int = 0
    sensory_len: int = 0
    segment_len: int = 0
    tail_len: int = 0


class Scheduler:
    """Rows of HMT generation over fixed-size state (module docstring).

    model: an HMTModel.  rows: sequences held at once.  engine: "auto" | "lean" | "transformers".
    cuda_graphs: "auto" (on for the lean engine on CUDA), True or False.

    Use: ``row = sched.add(ids)`` ingests a prompt (1-D ids) and leaves its next-token logits in
    ``sched.logits[row]``; ``sched.pick()`` chooses every live row's next token into ``sched.tokens`` (rows,)
    (or write them there yourself); ``sched.step()`` feeds them and refreshes ``sched.logits``;
    ``sched.release(row)`` frees a row; ``sched.export(row)`` copies its state (a batch-1 MemoryState).

        sched = Scheduler(model, rows=2)
        a, b = sched.add(ids_a), sched.add(ids_b)
        for _ in range(n):
            sched.pick()
            new_a, new_b = sched.tokens[[a, b]].tolist()
            sched.step()
    """

    def __init__(self, model: HMTModel, rows: int = 1, engine: str = "auto", cuda_graphs="auto"):
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise ValueError(f"rows={rows!r}: expected an integer >= 1")
        if cuda_graphs not in ("auto", True, False):
            raise ValueError(f"cuda_graphs={cuda_graphs!r}: expected 'auto', True or False")
        self.model, self.cfg, self.rows = model, model.config, rows
        with torch.no_grad():
            self.ops = model.ops()
        self.engine = make_engine(model, rows, engine, self.ops)
        self.kv = self.engine.kv
        device = model.device
        self.state = MemoryState.empty(self.cfg, rows, model.width, device=device, dtype=model.dtype)
        self.logits = torch.zeros(rows, model.vocab_size, device=device, dtype=model.dtype)
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device)  # the decode step's input (static)
        self.live_mask = torch.zeros(rows, dtype=torch.long, device=device)
        self.row_index = torch.arange(rows, device=device)
        self.host = [_Host() for _ in range(rows)]
        use_graphs = cuda_graphs if cuda_graphs != "auto" else (device.type == "cuda" and self.engine.name == "lean")
        if use_graphs and (device.type != "cuda" or self.engine.name != "lean"):
            raise ValueError(f"cuda_graphs=True: needs a CUDA model and the lean engine (device {device}, "
                             f"engine {self.engine.name!r})")
        self.graphs = _Graphs() if use_graphs else None
        self.static_span = False  # eager steps over all W positions, as a captured step runs (for tests)
        self.busy = False  # set by a generate() call while it uses this scheduler
        self._summary_in: dict[int, torch.Tensor] = {}
        self._prefill_in: dict[tuple[int, int], torch.Tensor] = {}

    # ------------------------------------------------------------------------------------------ rows
    def free_rows(self) -> list[int]:
        return [b for b, h in enumerate(self.host) if not h.live]

    def live_rows(self) -> list[int]:
        return [b for b, h in enumerate(self.host) if h.live]

    def add(self, ids: torch.Tensor, state: MemoryState | None = None, row: int | None = None,
            on_progress: Callable[[int], None] | None = None) -> int:
        """Ingest ``ids`` (L,) (L >= 1; may be long: memory stays flat) into a free row, continuing ``state``
        (a batch-1 MemoryState, not modified) if given.  Returns the row; its next-token logits are in
        ``self.logits[row]``.  On any error the row is freed and the other rows are untouched."""
        if row is None:
            free = self.free_rows()
            if not free:
                raise RuntimeError(f"all {self.rows} rows are live; release one first")
            row = free[0]
        elif self.host[row].live:
            raise ValueError(f"row={row}: the row is live; release it first")
        ids = check_ids(ids, self.model.vocab_size)
        if state is not None and state.batch_size != 1:
            raise ValueError(f"state: expected a batch-1 MemoryState, got {state.batch_size} rows")
        try:
            with torch.no_grad():
                self._load(row, state)
                self.host[row].live = True
                self._feed(row, ids.to(self.model.device)[None], on_progress)
                self.live_mask[row] = 1
        except BaseException:
            self.release(row)
            raise
        return row

    def release(self, row: int) -> None:
        """Free ``row`` (its state is reset when the row is next used)."""
        self.host[row] = _Host()
        self.live_mask[row] = 0
        self.state.segment_len[row] = 0  # scratch steps write segment_ids[row, segment_len]
        self.kv.set_len(row, 0)

    def export(self, row: int) -> MemoryState:
        """A batch-1 copy of ``row``'s state (its KV cache is not saved: it is rebuilt when resumed)."""
        return MemoryState(**{name: t[row : row + 1].clone() for name, t in self.state.tensors().items()})

    def _load(self, row: int, state: MemoryState | None) -> None:
        self.kv.set_len(row, 0)
        for name, target in self.state.tensors().items():
            if state is None:
                target[row].zero_()
            else:
                source = getattr(state, name)
                if source.shape[1:] != target.shape[1:]:
                    raise ValueError(f"state.{name}: shape {tuple(source.shape)} does not fit this model "
                                     f"(expected (1, {', '.join(map(str, target.shape[1:]))}))")
                target[row].copy_(source[0])
        h = self.host[row] = _Host()
        if state is None:
            return
        started, provisional, written, sensory, segment, tail = torch.stack([
            state.started[0].long(), state.provisional[0].long(), state.written[0], state.sensory_len[0],
            state.segment_len[0], state.tail_len[0]]).tolist()
        h.started, h.provisional, h.written = bool(started), bool(provisional), written
        h.sensory_len, h.segment_len, h.tail_len = sensory, segment, tail
        if h.started:  # rebuild the KV cache of the current segment: [P ; E(sensory) ; E(x so far)]
            tokens = self.state.segment_ids[row : row + 1, : h.segment_len]
            hidden = self.engine.prefill(row, self._segment_prefix(row, tokens), 0)
            if h.segment_len:
                self.logits[row] = self.model.lm_logits(hidden[:, -1])[0]

    # ------------------------------------------------------------------------------------------ events
    def _segment_prefix(self, row: int, tokens: torch.Tensor | None = None, trailing: bool = False) -> torch.Tensor:
        """[P ; E(sensory) ; E(tokens)] of ``row`` (then P again when ``trailing``): (1, 1 + k' + L + trailing, d)."""
        h = self.host[row]
        sensory = self.state.sensory_ids[row : row + 1, : h.sensory_len] if h.sensory_len else None
        if tokens is None:
            tokens = self.state.segment_ids[row : row + 1, :0]
        return self.model.segment_embeddings(self.state.recalled[row : row + 1], sensory, tokens, trailing=trailing)

    def _summarize(self, query_ids: torch.Tensor) -> torch.Tensor:
        """Spec step 1 on the engine: query_ids (1, j') -> S (1, d)."""
        prompt = self.model.summary_prompt[:, None, :]
        embeds = torch.cat([prompt, self.model.embed(query_ids), prompt], dim=1)
        if self.graphs is None:
            return self.engine.encode(embeds)[:, -1]
        length = embeds.shape[1]
        static = self._summary_in.setdefault(length, torch.empty_like(embeds))
        static.copy_(embeds)
        return self.graphs.run(("summary", length), lambda: self.engine.encode(static)[:, -1]).clone()

    def _recall(self, row: int, query_ids: torch.Tensor) -> None:
        """P of ``row``'s current segment into state.recalled[row] (M_init while the memory is empty)."""
        target = self.state.recalled[row : row + 1]
        if self.host[row].written == 0:
            target.copy_(self.model.memory_init)
            return
        st = self.state
        summary = self._summarize(query_ids)
        self.ops.recall(summary, st.memory[row : row + 1], st.keys[row : row + 1], st.written[row : row + 1],
                        self.model.recall.w_q.weight, out=target)

    def _prefill_boundary(self, row: int, embeds: torch.Tensor) -> torch.Tensor:
        """Prefill [P ; E(sensory)] (1, 1 + k', d) into ``row``'s empty cache (a CUDA graph per row when on)."""
        if self.graphs is None:
            return self.engine.prefill(row, embeds, 0)
        key = (row, embeds.shape[1])
        static = self._prefill_in.setdefault(key, torch.empty_like(embeds))
        static.copy_(embeds)
        hidden = self.graphs.run(("prefill",) + key, lambda: self._prefill_core(row, static))
        self.kv.host_lens[row] = embeds.shape[1]
        return hidden

    def _prefill_core(self, row, static):
        return self.engine.prefill(row, static, 0)

    def _query(self, row: int, upcoming: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """The recall query of ``row``'s next segment and whether it is provisional (spec "Recall modes",
        "Generation").  upcoming: (1, L) the segment's tokens known so far."""
        h, cfg = self.host[row], self.cfg
        j = cfg.summary_tokens
        tail = self.state.tail_ids[row : row + 1, j - h.tail_len :]
        if cfg.recall == "causal":
            return tail, False
        if upcoming.shape[1] >= j:
            return upcoming[:, :j], False
        return torch.cat([tail, upcoming], dim=1)[:, -j:], h.written > 0  # the newest j known tokens

    def _start(self, row: int, upcoming: torch.Tensor, chunk: torch.Tensor | None = None,
               trailing: bool = False) -> torch.Tensor:
        """Start ``row``'s segment: P from the recall query, then prefill [P ; E(sensory) ; E(chunk)] (and the
        trailing P when ``trailing``: the chunk completes the segment).  upcoming: (1, L) the segment's tokens
        known so far.  Returns the prefill's hidden states (1, 1 + k' + L + trailing, d)."""
        h = self.host[row]
        query, provisional = self._query(row, upcoming)
        self._recall(row, query)
        h.started, h.provisional = True, provisional
        self.state.started[row] = True
        self.state.provisional[row] = provisional
        self.kv.set_len(row, 0)
        embeds = self._segment_prefix(row, chunk, trailing)
        if chunk is None:
            return self._prefill_boundary(row, embeds)
        return self.engine.prefill(row, embeds, 0)

    def _refresh(self, row: int) -> torch.Tensor:
        """Paper mode at j tokens: the true P, and a re-prefill; returns the last position's hidden (1, d)."""
        j = self.cfg.summary_tokens
        tokens = self.state.segment_ids[row : row + 1, :j]
        self._recall(row, tokens)
        self.host[row].provisional = False
        self.state.provisional[row] = False
        self.kv.set_len(row, 0)
        return self.engine.prefill(row, self._segment_prefix(row, tokens), 0)[:, -1]

    def _close(self, row: int, memory: torch.Tensor | None = None, start_next: bool = True) -> None:
        """Feed the trailing P (unless its output ``memory`` (1, d) = M_n is given), write M_n, carry the sensory
        ids and the tail; in causal mode, with ``start_next``, start the next segment at once."""
        h, cfg, st = self.host[row], self.cfg, self.state
        if memory is None:
            memory = self.engine.prefill(row, st.recalled[row : row + 1, None, :], self.kv.host_lens[row])[:, -1]
        self.ops.memory_write(memory, self.model.recall.w_k.weight, st.memory[row : row + 1],
                              st.keys[row : row + 1], st.written[row : row + 1])
        tokens = st.segment_ids[row]
        if cfg.sensory_tokens:
            st.sensory_ids[row] = tokens[-cfg.sensory_tokens :]
            st.sensory_len[row] = cfg.sensory_tokens
        st.tail_ids[row] = tokens[-cfg.summary_tokens :]
        st.tail_len[row] = cfg.summary_tokens
        st.segment_len[row] = 0
        st.segments_done[row] += 1
        st.started[row] = False
        st.provisional[row] = False
        h.written += 1
        h.sensory_len, h.tail_len, h.segment_len = cfg.sensory_tokens, cfg.summary_tokens, 0
        h.started = h.provisional = False
        self.kv.set_len(row, 0)
        if cfg.recall == "causal" and start_next:
            self._start(row, st.segment_ids[row : row + 1, :0])

    # ------------------------------------------------------------------------------------------ ingestion
    def _feed(self, row: int, ids: torch.Tensor, on_progress=None) -> None:
        """Append ids (1, L) to ``row`` segment by segment; leaves the logits after the last one in ``logits``.

        Two backbone passes per full segment: the summary pass, and one prefill of [P ; E(sensory) ; E(x) ; P]
        (the trailing P rides along when the chunk completes the segment; the next segment starts with the next
        chunk).  A provisional paper-mode segment stops at j for its refresh."""
        h, cfg, st = self.host[row], self.cfg, self.state
        j, ls = cfg.summary_tokens, cfg.segment_tokens
        last = None
        pos, total = 0, ids.shape[1]
        while pos < total:
            if not h.started:
                upcoming = ids[:, pos : pos + ls]
                provisional = self._query(row, upcoming)[1]
                take = min(ls, total - pos, j if provisional else ls)
                chunk = ids[:, pos : pos + take]
                trailing = take == ls and not provisional
                hidden = self._start(row, upcoming, chunk, trailing)
            else:
                take = min(ls - h.segment_len, total - pos)
                if h.provisional and h.segment_len < j:
                    take = min(take, j - h.segment_len)
                chunk = ids[:, pos : pos + take]
                trailing = h.segment_len + take == ls and not h.provisional
                embeds = self.model.embed(chunk)
                if trailing:
                    embeds = torch.cat([embeds, st.recalled[row : row + 1, None, :]], dim=1)
                hidden = self.engine.prefill(row, embeds, self.kv.host_lens[row])
            memory = hidden[:, -1] if trailing else None
            last = hidden[:, -2] if trailing else hidden[:, -1]
            st.segment_ids[row, h.segment_len : h.segment_len + take] = chunk[0]
            h.segment_len += take
            st.segment_len[row] = h.segment_len
            pos += take
            if h.provisional and h.segment_len == j:
                last = self._refresh(row)
            if h.segment_len == ls:
                self._close(row, memory, start_next=pos == total)
            if on_progress is not None:
                on_progress(take)
        self.logits[row] = self.model.lm_logits(last)[0]

    # ------------------------------------------------------------------------------------------ decoding
    def pick(self, do_sample: bool = False, warpers=None) -> None:
        """Choose the next token of every row from ``logits`` into ``tokens`` (greedy, or sampled with the
        transformers logits warpers); rows that are not live get a scratch token."""
        batch = max(self.live_rows(), default=-1) + 1
        if batch == 0:
            return
        scores = self.logits[:batch]
        if not do_sample:
            torch.argmax(scores, dim=-1, out=self.tokens[:batch])
            return
        scores = scores.float()
        if warpers:
            scores = warpers(None, scores)
        self.tokens[:batch] = torch.multinomial(torch.softmax(scores, dim=-1), 1)[:, 0]

    def step(self) -> None:
        """Feed ``tokens[b]`` to every live row b: start events, one batched decode step, then refresh / close
        events; ``logits`` then holds every live row's next-token logits."""
        live = self.live_rows()
        if not live:
            return
        batch = live[-1] + 1
        with torch.no_grad():
            for row in live:
                if not self.host[row].started:
                    self._start(row, self.tokens[row : row + 1][None])
            if self.graphs is not None:
                bucket = next((b for b in GRAPH_BUCKETS if b >= batch and b <= self.rows), self.rows)
                self.graphs.run(("decode", bucket), lambda: self._decode_core(bucket, None))
            else:
                span = None if self.static_span else max(self.kv.host_lens[:batch]) + 1
                self._decode_core(batch, span)
            self.engine.commit(live)
            cfg = self.cfg
            for row in live:
                h = self.host[row]
                h.segment_len += 1
                if h.provisional and h.segment_len == cfg.summary_tokens:
                    self.logits[row] = self.model.lm_logits(self._refresh(row))[0]
                if h.segment_len == cfg.segment_tokens:
                    self._close(row)

    def _decode_core(self, batch: int, span: int | None) -> torch.Tensor:
        """Device-only part of a step for rows [0, batch): embed tokens, decode, logits, segment ids."""
        st = self.state
        embeds = self.model.embed(self.tokens[:batch, None])  # (B, 1, d)
        live = self.live_mask[:batch]
        if self.engine.name == "lean":
            hidden = self.engine.decode(embeds, live, span)
        else:
            hidden = self.engine.decode(embeds, live, span, live_rows=[b for b in range(batch) if self.host[b].live])
        self.logits[:batch] = self.model.lm_logits(hidden[:, 0])
        rows = self.row_index[:batch]
        st.segment_ids[rows, st.segment_len[:batch]] = self.tokens[:batch]
        st.segment_len[:batch] += live
        return self.logits

    def ingest(self, row: int, ids: torch.Tensor, on_progress=None) -> None:
        """Append ids (L,) to a live ``row`` (continue a document); its next-token logits land in ``logits``."""
        if not self.host[row].live:
            raise ValueError(f"row={row}: not live; add() a prompt first")
        ids = check_ids(ids, self.model.vocab_size)
        try:
            with torch.no_grad():
                self._feed(row, ids.to(self.model.device)[None], on_progress)
        except BaseException:
            self.release(row)
            raise


def check_ids(ids, vocab_size: int) -> torch.Tensor:
    """ids: a non-empty 1-D integer tensor with values in [0, vocab_size) -> int64."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"ids: expected a 1-D tensor of token ids, got {type(ids).__name__}")
    if ids.dim() != 1 or ids.numel() == 0:
        raise ValueError(f"ids: expected a non-empty 1-D tensor of token ids, got shape {tuple(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
        raise TypeError(f"ids: expected an integer tensor, got dtype {ids.dtype}")
    low, high = torch.aminmax(ids)
    low, high = int(low), int(high)
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"ids: token id {bad} is outside the vocabulary [0, {vocab_size})")
    return ids.long()
