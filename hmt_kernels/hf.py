"""Plugging an ``attention_with_kvcache`` op into transformers models.

``register_attention(name, attention_with_kvcache)`` makes ``attn_implementation=name`` usable with any
transformers model whose attention goes through ``AttentionInterface`` (Llama, Qwen2, Mistral, SmolLM2, ...):

    register_attention("my_attention", my_attention_with_kvcache)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="my_attention")

The op has the contract of ``hmt_runtime.ops.attention_with_kvcache_torch``:
``attention_with_kvcache(q, k_new, v_new, k_cache, v_cache, cache_lens, scale=None) -> out`` with
q: (B, Lq, Hq, D), k_new/v_new: (B, Lq, Hkv, D), k_cache/v_cache: (B, Hkv, W, D), cache_lens: (B,) int,
out: (B, Lq, Hq, D); it appends k_new/v_new at ``cache_lens`` and attends causally, bottom-right aligned.

Two names are registered: the attention function in ``AttentionInterface`` and a mask function in
``AttentionMaskInterface``.  Without the mask entry transformers builds no mask at all for an unknown name, and
padded batches would silently attend to padding.  The mask function returns ``None`` exactly when the mask is the
plain bottom-right causal mask over ``[0, kv_length)`` (no padding, no sliding window, no packed sequences), and
the sdpa-style boolean mask otherwise.

The attention function takes the fast path (the op) when the mask is ``None``, attention is causal, there is no
dropout, no softcap, position bias or attention sinks, autograd is not recording, and ``supports(query)``
holds.  Otherwise it falls back to transformers' sdpa attention: explicit 4D masks (padding, packed sequences,
sliding windows), bidirectional attention, training.  The fast path covers three cases:

* no cache (a plain forward): keys = the new keys, full causal attention;
* a cache that appends in ``Cache.update`` (``DynamicCache``): the new keys are already the tail of ``key``;
  the op is called with ``cache_lens = kv_length - Lq`` and that tail as ``k_new``/``v_new`` (a copy, or, for
  ops registered with ``tail_aliasing=True``, views aliasing the cache: the op then rewrites equal values);
* ``SegmentKVCache`` (below): ``update`` defers the append, and the op writes the new keys into the
  preallocated cache inside its own launch.

The deferred append needs nothing from transformers beyond ``Cache.update`` returning what the layer's ``update``
returns and the attention receiving it unchanged (true from transformers 5.17 on, where ``update`` is called
without the attention kwargs, to today's versions, where it gets them): ``SegmentKVLayer.update`` returns the new
states as they are and records them, with itself, in a per-thread slot; the attention function claims the slot
when the key it receives *is* that recorded tensor.  The cache argument of a model's ``forward`` and
``generate`` is ``past_key_values`` in transformers 5.17 and ``cache`` from 5.18; ``cache_argument(model)``
names the one the installed version takes.
"""
from __future__ import annotations

import functools
import inspect
import threading
from typing import Callable

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

# SegmentKVLayer.update -> attention function: the layer whose append is deferred and the key tensor it returned.
_pending = threading.local()

# Attention kwargs that change the scores (logit softcapping, additive position bias, attention sinks): the op
# has none of these, so calls carrying them use sdpa.
_SCORE_MODIFIERS = ("softcap", "position_bias", "s_aux", "sinks")

# Names registered through register_attention: their attention functions perform a deferred append.
_FUSED_APPEND_NAMES: set[str] = set()


@functools.lru_cache(maxsize=None)
def _forward_takes_cache(cls) -> bool:
    return "cache" in inspect.signature(cls.forward).parameters


def cache_argument(model) -> str:
    """The keyword through which ``model.forward`` / ``model.generate`` take a ``Cache``: ``"cache"``
    (transformers >= 5.18) or ``"past_key_values"`` (5.17)."""
    return "cache" if _forward_takes_cache(type(model)) else "past_key_values"


def _defer(layer: "SegmentKVLayer", key_states: torch.Tensor) -> None:
    stale = getattr(_pending, "layer", None)
    if stale is not None:
        _pending.layer = _pending.key = None
        raise RuntimeError(
            "SegmentKVCache: the append deferred by the previous update() was never performed (the attention "
            f"function did not receive its key tensor); the model's attention implementation "
            f"{stale.owner.config._attn_implementation!r} must pass the keys returned by Cache.update unchanged"
        )
    _pending.layer, _pending.key = layer, key_states


def _claim(key: torch.Tensor) -> "SegmentKVLayer | None":
    """The layer whose deferred append ``key`` is (and clear the slot), or None when ``key`` is not pending."""
    if getattr(_pending, "key", None) is not key:
        return None
    layer = _pending.layer
    _pending.layer = _pending.key = None
    return layer


def plain_causal_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Callable = causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    allow_is_causal_skip: bool = True,
    **kwargs,
) -> torch.Tensor | None:
    """Mask function for ``AttentionMaskInterface``: ``None`` for the plain bottom-right causal mask.

    ``None`` means: query i (of q_length) sees keys ``[0, kv_length - q_length + i]``.  It is returned when the
    pattern is plain causal, there is no sliding window, the keys start at 0 and end with the queries
    (``kv_length == q_offset + q_length``), and the 2D padding mask ``attention_mask`` (B, kv_length), if any,
    is all ones (checking it reads one value back from the device, as transformers' sdpa does).  Otherwise the
    sdpa boolean mask (B, 1, q_length, kv_length) is returned.
    """
    plain = (
        allow_is_causal_skip
        and mask_function is causal_mask_function
        and local_size is None
        and isinstance(q_offset, int)
        and kv_offset == 0
        and kv_length == q_offset + q_length
    )
    if plain and (attention_mask is None or bool(attention_mask[:, :kv_length].all())):
        return None
    return sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        local_size=local_size,
        allow_is_causal_skip=False,
        **kwargs,
    )


def _sdpa_fallback(module, query, key, value, attention_mask, dropout, scaling, causal, **kwargs):
    """transformers' sdpa attention, with the bottom-right causal mask made explicit when ``attention_mask`` is None.

    sdpa's own ``is_causal`` is top-left aligned, which differs from bottom-right when kv_length > q_length > 1.
    """
    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is None and causal and q_len > 1 and kv_len != q_len:
        q_pos = torch.arange(q_len, device=query.device)[:, None] + (kv_len - q_len)
        attention_mask = (torch.arange(kv_len, device=query.device)[None, :] <= q_pos)[None, None]
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=causal, **kwargs
    )


def make_attention_function(
    attention_with_kvcache: Callable,
    supports: Callable[[torch.Tensor], bool] | None = None,
    tail_aliasing: bool = False,
) -> Callable:
    """Wrap ``attention_with_kvcache`` as a transformers attention function (see the module docstring).

    The returned function has transformers' signature
    ``(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs)`` with
    query: (B, Hq, Lq, D), key/value: (B, Hkv, Lk, D), attention_mask: None or (B, 1, Lq, Lk), and returns
    ``(out, None)`` with out: (B, Lq, Hq, D).  ``supports(query)`` may veto the fast path (e.g. a device the op
    cannot run on); vetoed calls use sdpa.  ``tail_aliasing=True`` declares that the op accepts ``k_new``/``v_new``
    that alias the cache positions they are written to (saves copying the new keys when the cache already holds
    them); ops that check for overlapping writes (e.g. torch advanced indexing) need the default False.
    """

    def attention_forward(
        module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs
    ):
        segment_layer = _claim(key)
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        q_len, kv_len = query.shape[2], key.shape[2]
        recording = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
        fast = (
            attention_mask is None
            and causal
            and not dropout
            and all(kwargs.get(name) is None for name in _SCORE_MODIFIERS)
            and not recording
            and query.dtype == key.dtype == value.dtype  # under autocast RoPE can leave keys in fp32
            and (supports is None or supports(query))
        )
        if segment_layer is not None:
            # key/value are only the new positions (B, Hkv, Lq, D); the append is still to be done.
            if fast:
                out = attention_with_kvcache(
                    query.transpose(1, 2),
                    key.transpose(1, 2),
                    value.transpose(1, 2),
                    segment_layer.keys,
                    segment_layer.values,
                    segment_layer.lens,
                    scale=scaling,
                )
                segment_layer.lens += q_len
                return out, None
            key, value = segment_layer.append(key, value)
            return _sdpa_fallback(module, query, key, value, attention_mask, dropout, scaling, causal, **kwargs)
        if not fast or kv_len < q_len:
            return _sdpa_fallback(module, query, key, value, attention_mask, dropout, scaling, causal, **kwargs)
        # Keys already hold the new positions at their tail (plain forward: kv_len == q_len).
        cache_lens = torch.full((query.shape[0],), kv_len - q_len, dtype=torch.int32, device=query.device)
        k_tail = key[:, :, kv_len - q_len :].transpose(1, 2)
        v_tail = value[:, :, kv_len - q_len :].transpose(1, 2)
        if not tail_aliasing:
            k_tail, v_tail = k_tail.clone(), v_tail.clone()
        out = attention_with_kvcache(query.transpose(1, 2), k_tail, v_tail, key, value, cache_lens, scale=scaling)
        return out, None

    op_name = getattr(attention_with_kvcache, "__name__", "op")
    attention_forward.__doc__ = f"transformers attention function over {op_name}."
    return attention_forward


def register_attention(
    name: str,
    attention_with_kvcache: Callable,
    supports: Callable[[torch.Tensor], bool] | None = None,
    tail_aliasing: bool = False,
) -> None:
    """Register ``attention_with_kvcache`` as ``attn_implementation=name`` in transformers.

    Registers ``make_attention_function(attention_with_kvcache, supports, tail_aliasing)`` in ``AttentionInterface`` and
    ``plain_causal_mask`` in ``AttentionMaskInterface`` (both are needed, see the module docstring).  Registering
    the same name again replaces the previous entry.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name={name!r}: expected a non-empty string")
    if not callable(attention_with_kvcache):
        raise TypeError(f"attention_with_kvcache={attention_with_kvcache!r}: expected a callable")
    AttentionInterface.register(name, make_attention_function(attention_with_kvcache, supports, tail_aliasing))
    AttentionMaskInterface.register(name, plain_causal_mask)
    _FUSED_APPEND_NAMES.add(name)


class SegmentKVLayer(CacheLayerMixin):
    """One layer of ``SegmentKVCache``: keys/values (B, Hkv, W, D) preallocated, lens (B,) int32 on the device."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, window: int, owner: "SegmentKVCache"):
        super().__init__()
        self.window = window
        self.owner = owner
        self.length = 0  # tokens appended so far (host side; equal in every row)
        self.lens: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, kv_heads, _, head_dim = key_states.shape
        self.device = key_states.device
        self.batch_size = batch
        self.keys = torch.zeros(batch, kv_heads, self.window, head_dim, dtype=key_states.dtype, device=self.device)
        self.values = torch.zeros(
            batch, kv_heads, self.window, value_states.shape[-1], dtype=value_states.dtype, device=self.device
        )
        self.lens = torch.zeros(batch, dtype=torch.int32, device=self.device)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        """Take the new key_states/value_states (B, Hkv, Lq, D).

        With a registered fused attention (``register_attention``) the append is deferred to the attention op:
        this returns the new states unchanged and records them for the attention function (module docstring).
        Otherwise it appends now and returns the cached keys/values (B, Hkv, length, D).
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q_len = key_states.shape[-2]
        if self.length + q_len > self.window:
            raise ValueError(
                f"SegmentKVCache: appending {q_len} positions to {self.length} exceeds the window {self.window}"
            )
        if self.owner.defers_append():
            _defer(self, key_states)
            self.length += q_len
            return key_states, value_states
        self.length += q_len
        return self.append(key_states, value_states)

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """Write key_states/value_states (B, Hkv, Lq, D) at ``lens`` and advance ``lens``; no host sync.

        Returns the cached keys and values (B, Hkv, length, D), ``length`` counting this append.
        """
        q_len = key_states.shape[-2]
        pos = self.lens.long()[:, None] + torch.arange(q_len, device=self.device)[None, :]  # (B, Lq)
        rows = torch.arange(self.batch_size, device=self.device)[:, None].expand_as(pos)
        self.keys[rows, :, pos] = key_states.transpose(1, 2).to(self.keys.dtype)
        self.values[rows, :, pos] = value_states.transpose(1, 2).to(self.values.dtype)
        self.lens += q_len
        return self.keys[:, :, : self.length], self.values[:, :, : self.length]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.window

    def reset(self) -> None:
        self.length = 0
        if getattr(_pending, "layer", None) is self:  # a forward that failed between update and attention
            _pending.layer = _pending.key = None
        if self.is_initialized:
            self.lens.zero_()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("SegmentKVCache cannot be cropped; call reset() to start a new segment")


class SegmentKVCache(Cache):
    """A transformers ``Cache`` with a preallocated window per layer whose append happens inside the attention op.

    Per layer: keys/values (B, Hkv, window, D), allocated at the first update, and ``lens`` (B,) int32 on the
    device.  With an attention registered through ``register_attention`` (e.g. ``"hmt_triton"``) the new keys
    are written by the attention launch itself (no separate copy); with any other attention implementation
    ``update`` appends eagerly and the cache behaves like a bounded ``DynamicCache``.  All rows hold the same
    number of tokens.  ``reset()`` empties it for the next segment without freeing memory.

    Args:
        config: the model's config (its ``num_hidden_layers`` and ``_attn_implementation`` are read).
        window: positions per layer (W).
    """

    def __init__(self, config, window: int):
        if not isinstance(window, int) or window <= 0:
            raise ValueError(f"window={window!r}: expected a positive int")
        text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        self.config = text_config
        self.window = window
        super().__init__(layers=[SegmentKVLayer(window, self) for _ in range(text_config.num_hidden_layers)])

    def defers_append(self) -> bool:
        """Whether the model's attention implementation performs the append (registered via register_attention)."""
        return getattr(self.config, "_attn_implementation", None) in _FUSED_APPEND_NAMES

    @property
    def max_cache_len(self) -> int:
        return self.window
