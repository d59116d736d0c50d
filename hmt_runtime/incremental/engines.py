"""Engines: what runs the backbone over the scheduler's static KV buffers (docs/generation.md).

Every engine has the interface of ``Engine``: ``encode`` (a pass without cache: the summary pass), ``prefill``
(positions appended to one row's cache), ``decode`` (one position for every row at once) and ``commit`` (host-side
bookkeeping after a decode), with the same signatures, and owns a ``StaticKV``.

* ``LlamaEngine`` ("lean"): a lean forward of Llama-family decoders (Llama / SmolLM2, Mistral, Qwen2) over the
  backbone's own weights, op for op what transformers computes, with a batched decode step.  Projections are
  ``nn.Linear`` or ``QuantLinear`` (``hmt_runtime.native.quant``, low-precision weights), with or without LoRA (peft)
  adapters: a LoRA over a float weight runs merged into a copy the engine owns
  (W + scale * B A; the peft model keeps its adapter for training and saving), a LoRA over a quantized weight
  beside it.  With the native kernels on CPU, a decode step is one op (``torch.ops.hmt.decode_step``,
  csrc/cpu/decode.cpp) for the whole decoder.
* ``HFEngine`` ("transformers"): any other transformers backbone through its own forward, one row at a time, with
  a ``Cache`` whose storage is the static buffers.

Over 500 lines: the engines share the static KV buffers and one interface.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin

from ..core import backbones

LLAMA_FAMILY = ("llama", "mistral", "qwen2")


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


class Projection:
    """One projection y = x W^T (+ b) of the lean engine, in the form the backbone stores it.

    A plain ``nn.Linear`` (its own tensors), a ``QuantLinear`` (``hmt_runtime.native.quant``: fp32 / bf16 / int8 / 4-bit
    weights run by the native kernels), or either one under a peft LoRA adapter.  A LoRA over a float ``nn.Linear``
    is merged into a copy the engine owns (W + scale * B A, computed in float64); a LoRA over a QuantLinear stays
    beside it (``lora_a`` (r, K), ``lora_b`` (N, r), several adapters stacked into one, scales folded into B).
    ``__call__(x)``: (..., K) -> (..., N).  ``kernel_args()``: what ``torch.ops.hmt.decode_step`` takes.
    """

    compact_lora = True  # the adapter beside integer dots goes to the decode step compact (``kernel_args``)

    def __init__(self, module: nn.Module):
        adapters, base = _projection_parts(module)
        self.lora_a = self.lora_b = self.lora_bt = None
        self._decode_lora = None  # (compact, A, B^T tiles) as the decode step takes them (kernel_args)
        self.quant = None
        if type(base) is nn.Linear:
            self.weight, self.bias = base.weight, base.bias
            if adapters:
                with torch.no_grad():
                    merged = base.weight.double()
                    for a, b, scale in adapters:
                        merged = merged + scale * (b.double() @ a.double())
                    self.weight = merged.to(base.weight.dtype)
        elif _is_quant_linear(base):
            self.quant, self.weight, self.bias = base, base.qweight, base.bias
            if adapters:
                with torch.no_grad():
                    # one copy: B^T (r, N), the native decode step's layout, with the scales folded in; A is the
                    # adapter's own tensor when there is one float32 adapter (several are stacked)
                    if len(adapters) == 1 and adapters[0][0].dtype == torch.float32 and adapters[0][0].is_contiguous():
                        self.lora_a = adapters[0][0].detach()
                    else:
                        self.lora_a = torch.cat([a.detach().float() for a, _, _ in adapters]).contiguous()
                    self.lora_bt = torch.cat([b.detach().float().t() * scale for _, b, scale in adapters]).contiguous()
                    self.lora_b = self.lora_bt.t()  # (N, r), a view

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant is None:
            return F.linear(x, self.weight, self.bias)
        y = self.quant(x)
        if self.lora_a is not None:
            y = y + F.linear(F.linear(x, self.lora_a.to(x.dtype)), self.lora_b.to(x.dtype))
        return y

    def kernel_args(self):
        """(weight, scale, bias, format, lora_a (r, K), lora_b, lora_scale) for the native decode step, lora_b
        being B^T in tiles of 16 outputs (``_bt_tiles``).

        Beside a weight that takes the integer dot products (``QuantLinear.int_dot``: x already quantized to
        int8 per block of 32), the adapter goes to the decode step compact: A as Q8_0 blocks multiplied by the
        same integer dots, B in bfloat16 (a quarter and a half of the float32 bytes; docs/native.md "The adapter
        beside the blocks").  Float32 otherwise, and always in ``__call__`` (prefill, training)."""
        if self.quant is not None:
            a = b = None
            if self.lora_a is not None:
                compact = bool(self.quant.int_dot and self.compact_lora)
                if self._decode_lora is None or self._decode_lora[0] != compact:
                    from ..native.quant import quantize_q8_0

                    a = quantize_q8_0(self.lora_a) if compact else self.lora_a
                    tiles = _bt_tiles(self.lora_bt, torch.bfloat16 if compact else torch.float32)
                    self._decode_lora = (compact, a, tiles)
                _, a, b = self._decode_lora
            return (self.weight, self.quant.scale, self.bias, self.quant.kernel_format, a, b, 1.0)
        fmt = {torch.float32: "fp32", torch.bfloat16: "bf16"}[self.weight.dtype]
        bias = None if self.bias is None else self.bias.float()
        return (self.weight, None, bias, fmt, None, None, 0.0)


LOW_RANK_TILE = 16  # outputs per tile of B^T in the decode step (csrc/cpu/linear.h, LowRank)


def _bt_tiles(bt: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """B^T (r, N) -> (ceil(N / 16), r, 16) in ``dtype``: the r coefficients of 16 consecutive outputs contiguous
    (zero past N), so that the thread computing those outputs reads them in one sequential piece."""
    r, n = bt.shape
    tiles = -(-n // LOW_RANK_TILE)
    padded = torch.zeros(r, tiles * LOW_RANK_TILE, dtype=torch.float32)
    padded[:, :n] = bt.float()
    return padded.reshape(r, tiles, LOW_RANK_TILE).transpose(0, 1).contiguous().to(dtype)


def _is_quant_linear(module: nn.Module) -> bool:
    return type(module).__name__ == "QuantLinear" and hasattr(module, "qweight") and hasattr(module, "kernel_format")


@dataclass
class _LayerWeights:
    ln_in: torch.Tensor
    eps_in: float
    q: Projection
    k: Projection
    v: Projection
    o: Projection
    ln_post: torch.Tensor
    eps_post: float
    gate: Projection
    up: Projection
    down: Projection


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


def _projection_parts(module: nn.Module):
    """(LoRA adapters or None, base layer) of a projection; ValueError when the engine cannot run it."""
    adapters = _lora_adapters(module)
    base = module if adapters is None else module.base_layer
    if type(base) is not nn.Linear and not _is_quant_linear(base):
        raise ValueError(f"a projection is a {type(base).__name__}, not an nn.Linear or a QuantLinear")
    return adapters, base


def _lora_adapters(module: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor, float]] | None:
    """The active plain-LoRA adapters of a peft ``lora.Linear`` as (A (r, in), B (out, r), scale) triples;
    None when ``module`` is not a peft LoRA layer.  Raises ValueError for LoRA forms the merge cannot express."""
    if not (hasattr(module, "base_layer") and hasattr(module, "lora_A") and hasattr(module, "lora_B")):
        return None
    if getattr(module, "merged", False):
        raise ValueError("a LoRA layer is merged into its base weight already")
    if getattr(module, "disable_adapters", False):
        return []
    adapters = []
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        if name in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(name, False):
            raise ValueError(f"LoRA adapter {name!r} is a variant (e.g. DoRA), not a plain low-rank product")
        if getattr(module, "lora_bias", {}).get(name, False):
            raise ValueError(f"LoRA adapter {name!r} has a bias")
        adapters.append((module.lora_A[name].weight, module.lora_B[name].weight, float(module.scaling[name])))
    return adapters


def lean_unsupported_reason(backbone: nn.Module, window: int) -> str | None:
    """Why ``LlamaEngine`` cannot run ``backbone`` exactly (None when it can)."""
    config = getattr(backbones.unwrap(backbone), "config", None)
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
            try:
                _projection_parts(module)
            except ValueError as err:
                return str(err)
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if not hasattr(norm, "variance_epsilon") or set(vars(norm).get("_parameters", {})) != {"weight"}:
                return f"a norm is a {type(norm).__name__} of unexpected form"
        if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
            return "the attention normalises q/k (not a Llama-family layer)"
        if getattr(attn, "sliding_window", None) is not None and attn.sliding_window < window:
            return "a layer uses a sliding window shorter than the HMT window"
    return None


class Engine:
    """The interface every engine implements (the scheduler calls nothing else).

    ``name``: "lean" or "transformers".  ``kv``: the engine's ``StaticKV`` (rows, Hkv, W, D per layer).
    ``window``: W.  Every method takes input embeddings and returns final (post-norm) hidden states.
    """

    name: str
    kv: "StaticKV"
    window: int

    def encode(self, embeds: torch.Tensor) -> torch.Tensor:
        """A pass without cache (the summary pass): embeds (B, L, d) at positions [0, L) -> hidden (B, L, d)."""
        raise NotImplementedError

    def prefill(self, row: int, embeds: torch.Tensor, start: int) -> torch.Tensor:
        """Row ``row``: embeds (1, L, d) at segment positions [start, start + L), appended to the row's cache
        (which holds exactly ``start`` positions) -> hidden (1, L, d).  Sets the row's length to start + L."""
        raise NotImplementedError

    def decode(self, embeds: torch.Tensor, live: torch.Tensor, span: int | None = None,
               live_rows: Iterable[int] = ()) -> torch.Tensor:
        """One position for rows [0, B): embeds (B, 1, d), row b at position ``kv.lens[b]``; live: (B,) int64, 1
        for rows whose length advances (the others are scratch); live_rows: the same as host ints.  span: cache
        positions attended to (host-known ``max(lens) + 1``; None = all W, as a captured CUDA graph runs).
        Returns hidden (B, 1, d).  The device lengths advance; the host lengths wait for ``commit``."""
        raise NotImplementedError

    def logits(self, model, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head over decode hidden states (B, d) -> (B, V): ``model.lm_logits`` unless the engine has a
        faster equal form."""
        return model.lm_logits(hidden)

    def commit(self, live_rows: Iterable[int]) -> None:
        """Host-side bookkeeping after ``decode``: the live rows' lengths advanced by one."""
        for row in live_rows:
            self.kv.host_lens[row] += 1


class LlamaEngine(Engine):
    """A lean forward of a Llama-family decoder over ``StaticKV`` (the backbone's own weight tensors; a LoRA
    projection as a merged copy, see the module docstring).

    Same math as transformers' Llama / Mistral / Qwen2 layers, op for op, without the per-call machinery
    (masks, cache objects, module hooks).  Attention: the backend's ``attention_with_kvcache`` when it is not
    the torch reference (Triton / native: the fused append + attention), else sdpa over views of the buffers.

    All methods take input embeddings and return final (post-norm) hidden states; none allocates KV memory.
    """

    name = "lean"

    def __init__(self, backbone: nn.Module, kv_rows: int, window: int, ops=None, fused_decode: bool = False,
                 kv_dtype: torch.dtype | None = None):
        """fused_decode: run ``decode`` as one native op (``torch.ops.hmt.decode_step``; float32 activations on
        CPU, the native extension loaded); ``hmt_runtime.incremental.backend`` decides.  kv_dtype: the KV
        cache's storage type (default: the backbone's); another one than the backbone's needs the native
        attention, which appends in the cache's type and reads it widened (float32 activations with a bfloat16
        cache: half the bytes per position read by every decode step)."""
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
                Projection(attn.q_proj), Projection(attn.k_proj), Projection(attn.v_proj), Projection(attn.o_proj),
                layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon,
                Projection(mlp.gate_proj), Projection(mlp.up_proj), Projection(mlp.down_proj),
            ))
        self.scale = float(getattr(body.layers[0].self_attn, "scaling", self.head_dim ** -0.5))
        self.norm_weight, self.norm_eps = body.norm.weight, body.norm.variance_epsilon
        half = self.head_dim // 2
        self.rotary = body.rotary_emb
        self.perm = torch.cat([torch.arange(half, self.head_dim), torch.arange(half)]).to(self.device)
        self.cos, self.sin = self.rope(torch.arange(window, device=self.device))  # (W, D): one segment's positions
        self.fused = ops.attention_with_kvcache if ops is not None and ops.name != "torch" else None
        kv_dtype = self.dtype if kv_dtype is None else kv_dtype
        if kv_dtype != self.dtype and (ops is None or ops.name != "native"):
            raise ValueError(f"kv_dtype={kv_dtype}: a KV cache in another type than the backbone's "
                             f"({self.dtype}) needs the native attention, got the "
                             f"{'torch' if ops is None else ops.name} ops")
        self.kv = StaticKV(self.n_layers, kv_rows, window, self.device, kv_dtype, (self.kv_heads, self.head_dim))
        self.positions = torch.arange(window, device=self.device)  # (W,)
        self.row_index = torch.arange(kv_rows, device=self.device)  # (rows,)
        self.step_args = self._step_args() if fused_decode else None
        # With the fused decode step, a plain float32 LM head runs on the native weight-only kernel too (for a
        # few rows it reads the weight ~2x faster than torch's GEMM on the CPUs measured).
        head = inner.get_output_embeddings()
        self.head = None
        if (fused_decode and type(head) is nn.Linear and head.weight.dtype == torch.float32
                and head.weight.is_contiguous() and not getattr(config, "final_logit_softcapping", None)):
            self.head = (head.weight, None if head.bias is None else head.bias.float().contiguous())

    def logits(self, model, hidden: torch.Tensor) -> torch.Tensor:
        if self.head is None or hidden.dtype != torch.float32 or hidden.shape[0] >= 32 or torch.is_grad_enabled():
            return model.lm_logits(hidden)
        return torch.ops.hmt.linear(hidden.contiguous(), self.head[0], None, self.head[1], "fp32")

    def _step_args(self) -> dict:
        """The per-model arguments of ``torch.ops.hmt.decode_step`` (weights in layer order, norms, eps)."""
        columns = [[] for _ in range(7)]  # weights, scales, biases, formats, lora_a, lora_b, lora_scale
        norms, eps = [], []
        for w in self.layers:
            for proj in (w.q, w.k, w.v, w.o, w.gate, w.up, w.down):
                for column, value in zip(columns, proj.kernel_args()):
                    column.append(value)
            norms += [w.ln_in.float().contiguous(), w.ln_post.float().contiguous()]
            eps += [float(w.eps_in), float(w.eps_post)]
        norms.append(self.norm_weight.float().contiguous())
        eps.append(float(self.norm_eps))
        names = ("weights", "scales", "biases", "formats", "lora_a", "lora_b", "lora_scale")
        return dict(zip(names, columns), norms=norms, eps=eps, cos=self.cos.float(), sin=self.sin.float())

    # -------------------------------------------------------------------------------------------- the layers
    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The backbone's rotary tables at ``positions`` (L,) -> (cos, sin signed) (L, D), in the engine's dtype
        (see ``rotate``)."""
        with torch.no_grad():
            probe = torch.zeros(1, dtype=self.dtype, device=self.device)
            cos, sin = self.rotary(probe, positions[None])
        half = self.head_dim // 2
        return cos[0].contiguous(), torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1).contiguous()

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE of x (..., D) with tables from ``rope`` broadcast against it."""
        return _rotate(x, cos, sin, self.perm)

    def run_layers(self, x: torch.Tensor, attend: Callable, cos: torch.Tensor | None = None,
                  sin: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder layers and the final norm: x (B, L, d) -> hidden (B, L, d).  attend(layer, q (B, L, Hq, D),
        k, v (B, L, Hkv, D)) -> (B, L, Hq, D); q and k are rotated by cos / sin (B, L, 1, D) (sin signed, see
        ``_rotate``) when given, else passed un-rotated (an attention that places keys itself: StreamingLLM)."""
        batch, length = x.shape[:2]
        for index, w in enumerate(self.layers):
            h = _rms_norm(x, w.ln_in, w.eps_in)
            q = w.q(h).view(batch, length, self.q_heads, self.head_dim)
            k = w.k(h).view(batch, length, self.kv_heads, self.head_dim)
            if cos is not None:
                q, k = self.rotate(q, cos, sin), self.rotate(k, cos, sin)
            v = w.v(h).view(batch, length, self.kv_heads, self.head_dim)
            out = attend(index, q, k, v)
            x = x + w.o(out.reshape(batch, length, self.q_heads * self.head_dim))
            h = _rms_norm(x, w.ln_post, w.eps_post)
            x = x + w.down(F.silu(w.gate(h)) * w.up(h))
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

        return self.run_layers(embeds, attend, cos, sin)

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

        hidden = self.run_layers(embeds, attend, cos, sin)
        kv.set_len(row, end)
        return hidden

    def decode(self, embeds, live, span=None, live_rows=()):
        """See ``Engine.decode``.  Device-only (no host sync; ``live_rows`` is not needed): capturable."""
        batch = embeds.shape[0]
        kv = self.kv
        lens = kv.lens[:batch]
        if self.step_args is not None:
            a = self.step_args
            hidden = torch.ops.hmt.decode_step(
                embeds[:, 0].float().contiguous(), a["weights"], a["scales"], a["biases"], a["formats"], a["lora_a"],
                a["lora_b"], a["lora_scale"], a["norms"], a["eps"], a["cos"][lens], a["sin"][lens], kv.keys,
                kv.values, lens, self.scale, self.q_heads, self.kv_heads)
            lens += live
            return hidden.to(embeds.dtype)[:, None]
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

        hidden = self.run_layers(embeds, attend, cos, sin)
        lens += live
        return hidden

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


class HFEngine(Engine):
    """Any transformers backbone through its own forward (``HMTModel.run_backbone``), one row at a time, with a
    ``Cache`` whose storage is the static buffers.  Same entry points as ``LlamaEngine``."""

    name = "transformers"

    def __init__(self, model, kv_rows: int, window: int):
        """model: the HMTModel (its ``run_backbone``)."""
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
        """See ``Engine.decode``: row by row, through the backbone's own forward."""
        hidden = torch.zeros_like(embeds)
        for row in live_rows:
            start = self.kv.host_lens[row]
            hidden[row : row + 1] = self.model.run_backbone(embeds[row : row + 1], start, _RowCache(self.kv, row, start))
        self.kv.lens[: embeds.shape[0]] += live
        return hidden



def make_engine(model, rows: int, kind: str, ops=None, fused_decode: bool = False,
                kv_dtype: torch.dtype | None = None) -> Engine:
    """The engine ``kind`` ("lean" | "transformers", chosen by ``hmt_runtime.incremental.backend.select_backend``) for
    ``model`` (an HMTModel) with ``rows`` rows of ``model.config.kv_window`` positions (W, and the replayed
    slots' ids with ``replay``); kv_dtype (lean only): the KV cache's storage type, default the model's."""
    window = model.config.kv_window
    if kind == "lean":
        return LlamaEngine(model.backbone, rows, window, ops, fused_decode, kv_dtype)
    if kind == "transformers":
        return HFEngine(model, rows, window)
    raise ValueError(f"engine kind {kind!r}: expected 'lean' or 'transformers'")
