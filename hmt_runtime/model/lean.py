"""A Llama-family causal LM for inference without transformers' modeling code, and LoRA adapters without peft.

Importing transformers' modeling (and peft, which imports it) costs ~170 MB of resident memory before a single
weight is read (it pulls in torch._dynamo, torch.distributed.tensor and sympy); the default backbone in q4 is
~100 MB of blocks.  ``LlamaForCausalLM`` here has transformers' module tree and names (``model.embed_tokens``,
``model.layers[i].self_attn.q_proj`` ..., ``model.norm``, ``lm_head``) and its config, so the loaders, the
quantizer, the engines and ``HMTModel`` treat it as they treat transformers' model; its forward is the lean
engine's layer loop (``incremental.engines.LlamaEngine.run_layers``: one layer implementation), tested equal to
transformers' forward.  ``LoraLinear`` holds a plain LoRA adapter beside its base layer with peft's attribute
names (``base_layer``, ``lora_A`` / ``lora_B`` per adapter name, ``scaling``, ``active_adapters``), read from and
written to peft's adapter files, so a checkpoint's adapter loads either way.  Inference only: training uses
transformers and peft (``load_backbone(weights="fp32")``).
"""
from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..incremental.engines import LlamaEngine, _rms_norm

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


class LlamaConfig:
    """A Llama ``config.json``'s fields as attributes, under transformers' names (transformers' own ``LlamaConfig``
    imports its modeling utilities).  ``get_text_config()`` and ``to_dict()`` as transformers' configs have."""

    model_type = "llama"

    def __init__(self, **fields):
        self.hidden_act = "silu"
        self.attention_bias = self.mlp_bias = self.tie_word_embeddings = False
        self.rms_norm_eps = 1e-6
        self.head_dim = self.num_key_value_heads = self.pad_token_id = None
        self.bos_token_id = self.eos_token_id = None
        self.rope_parameters = self.rope_scaling = None
        self._attn_implementation = None
        self.__dict__.update(fields)
        missing = [k for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                               "vocab_size") if not isinstance(getattr(self, k, None), int)]
        if missing:
            raise ValueError(f"the backbone config lacks {missing} (integers a Llama config holds)")

    @classmethod
    def from_folder(cls, folder) -> "LlamaConfig":
        path = Path(folder) / "config.json"
        try:
            fields = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{str(path)!r}: not a readable model config ({err})") from None
        if not isinstance(fields, dict) or fields.get("model_type") != "llama":
            found = fields.get("model_type") if isinstance(fields, dict) else None
            raise ValueError(f"{str(path)!r}: model_type {found!r}; the lean model runs 'llama' only")
        return cls(**fields)

    def get_text_config(self, *args, **kwargs) -> "LlamaConfig":
        return self

    def to_dict(self) -> dict:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")} | {"model_type": self.model_type}


def _linear(in_features: int, out_features: int, bias: bool, weight: torch.Tensor | None = None) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight`` (out, in) or, without it, uninitialised storage on the meta device for
    the loader to replace; never initialised at random (building it through ``nn.Linear(..., device="meta")``
    runs its initialisation through torch's reference ops, which import torch._dynamo: ~100 MB)."""
    layer = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(layer)
    layer.in_features, layer.out_features = in_features, out_features
    if weight is None:
        weight = torch.empty(out_features, in_features, device="meta")
    layer.weight = nn.Parameter(weight)
    layer.bias = nn.Parameter(torch.empty(out_features, device="meta")) if bias else None
    return layer


def _embedding(rows: int, width: int, padding_idx: int | None) -> nn.Embedding:
    return nn.Embedding(rows, width, padding_idx, _weight=torch.empty(rows, width, device="meta"))


class RMSNorm(nn.Module):
    """transformers' LlamaRMSNorm: ``weight`` and ``variance_epsilon``."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(width, device="meta"))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _rms_norm(x, self.weight, self.variance_epsilon)


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    scaling = getattr(config, "rope_scaling", None)
    if rope_type != "default" or (scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default")):
        raise ValueError(f"rope type {rope_type!r} / rope_scaling {scaling!r}: the lean model runs the default RoPE "
                         "only; load the backbone with transformers (weights='fp32')")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ValueError("the backbone config names no rope_theta")
    return float(theta)


class RotaryEmbedding(nn.Module):
    """transformers' default RoPE tables: forward(x, position_ids (B, L)) -> (cos, sin) (B, L, D) in x's dtype."""

    def __init__(self, config):
        super().__init__()
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        inv_freq = 1.0 / (_rope_theta(config) ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.attention_scaling = 1.0
        self.config = config

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        bias = bool(getattr(config, "attention_bias", False))
        self.q_proj = _linear(config.hidden_size, heads * head_dim, bias)
        self.k_proj = _linear(config.hidden_size, kv_heads * head_dim, bias)
        self.v_proj = _linear(config.hidden_size, kv_heads * head_dim, bias)
        self.o_proj = _linear(heads * head_dim, config.hidden_size, bias)
        self.scaling = head_dim ** -0.5


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        bias = bool(getattr(config, "mlp_bias", False))
        self.gate_proj = _linear(config.hidden_size, config.intermediate_size, bias)
        self.up_proj = _linear(config.hidden_size, config.intermediate_size, bias)
        self.down_proj = _linear(config.intermediate_size, config.hidden_size, bias)


class DecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)


@dataclass
class BodyOutput:
    last_hidden_state: torch.Tensor


@dataclass
class CausalLMOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None


class LlamaModel(nn.Module):
    """The decoder body: forward(inputs_embeds (B, L, d), position_ids (B, L)) -> ``last_hidden_state``
    (post-final-norm), causal attention over the L positions (no cache: the runtime's engines keep their own)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = _embedding(config.vocab_size, config.hidden_size, getattr(config, "pad_token_id", None))
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.engine_owner = None  # set by LlamaForCausalLM (the engine reads the whole model)

    def forward(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values=None, use_cache: bool = False,
                **unused) -> BodyOutput:
        if past_key_values is not None:
            raise ValueError("the lean Llama model takes no cache (the runtime's engines hold the KV cache)")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("the lean Llama model takes exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        engine = self.engine_owner.engine()
        length = inputs_embeds.shape[1]
        if position_ids is None:
            position_ids = torch.arange(length, device=inputs_embeds.device)[None]
        if position_ids.shape[0] > 1 and not bool((position_ids == position_ids[:1]).all()):
            raise ValueError("the lean Llama model takes one set of positions for every row")
        cos, sin = engine.rope(position_ids[0])

        def attend(_, q, k, v):
            return engine._sdpa(q, k.transpose(1, 2), v.transpose(1, 2), causal=True)

        return BodyOutput(engine.run_layers(inputs_embeds, attend, cos[None, :, None], sin[None, :, None]))


class LlamaForCausalLM(nn.Module):
    """Llama / SmolLM2 with transformers' names and config fields (``config``: ``LlamaConfig`` above).  Built with
    its weights on the meta device, for a loader to fill (``hmt_runtime.model.loading``).  ``base_model`` is the
    body; the LM head is ``lm_head`` (tied to the input embedding when the config says so)."""

    hmt_lean = True  # its attention is the engine's: no transformers attention is registered for it

    def __init__(self, config):
        super().__init__()
        if getattr(config, "model_type", None) != "llama" or getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"model_type {getattr(config, 'model_type', None)!r} / hidden_act "
                             f"{getattr(config, 'hidden_act', None)!r}: the lean model runs Llama (silu) only")
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = _linear(config.hidden_size, config.vocab_size, False)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight
        self.model.engine_owner = _EngineCache(self)
        self.lora_config: dict | None = None

    @property
    def base_model(self) -> LlamaModel:
        return self.model

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, module: nn.Module) -> None:
        self.model.embed_tokens = module

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, module: nn.Module) -> None:
        self.lm_head = module

    def set_attn_implementation(self, name: str) -> None:
        """Recorded only: the lean forward's attention is the engine's."""
        self.config._attn_implementation = name

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **unused) -> "CausalLMOutput":
        """input_ids (B, L) -> ``.logits`` (B, L, V) (positions 0 .. L-1, no cache), and with ``labels`` (B, L)
        ``.loss``, the mean cross-entropy of labels[:, 1:] (-100 ignored), as transformers' model returns them.
        ``attention_mask`` may only be all ones (rows of one length: the lean forward pads nothing)."""
        if attention_mask is not None and not bool((attention_mask == 1).all()):
            raise ValueError("attention_mask: the lean model runs unpadded rows only (a mask of ones); pad-free "
                             "batches, or the runtime's scheduler, take rows of different lengths")
        logits = self.lm_head(self.model(input_ids=input_ids).last_hidden_state)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutput(logits, loss)

    @contextlib.contextmanager
    def disable_adapter(self):
        """While active, the LoRA adapters are off (peft's ``disable_adapter``)."""
        layers = [m for m in self.modules() if isinstance(m, LoraLinear)]
        for m in layers:
            m.disable_adapters = True
        self.model.engine_owner.clear()
        try:
            yield
        finally:
            for m in layers:
                m.disable_adapters = False
            self.model.engine_owner.clear()

    def save_adapter(self, directory) -> None:
        """Write the LoRA adapter as peft writes it (``adapter_config.json``, ``adapter_model.safetensors``)."""
        if self.lora_config is None:
            raise ValueError("this model has no LoRA adapter to save")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for name, module in self.named_modules():
            if isinstance(module, LoraLinear):
                tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = module.lora_A["default"].weight.detach().contiguous()
                tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = module.lora_B["default"].weight.detach().contiguous()
        save_file(tensors, directory / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        (directory / ADAPTER_CONFIG).write_text(json.dumps(self.lora_config, indent=2))


class _EngineCache:
    """The lean engine the body's forward runs (rebuilt when an adapter is attached or switched off)."""

    def __init__(self, model: LlamaForCausalLM):
        self._model = [model]  # a list, not an attribute nn.Module would register as a child
        self._engine = None

    def engine(self) -> LlamaEngine:
        if self._engine is None:
            self._engine = LlamaEngine(self._model[0], 0, 1)
        return self._engine

    def clear(self) -> None:
        self._engine = None


class LoraLinear(nn.Module):
    """y = base_layer(x) + scaling * lora_B(lora_A(x)), with peft's attribute names (one adapter, "default")."""

    def __init__(self, base: nn.Module, a: torch.Tensor, b: torch.Tensor, scaling: float):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.ModuleDict({"default": _linear(a.shape[1], a.shape[0], False, a.contiguous())})
        self.lora_B = nn.ModuleDict({"default": _linear(b.shape[1], b.shape[0], False, b.contiguous())})
        self.requires_grad_(False)  # inference only (the engine runs a copy); train with weights="fp32" and peft
        self.scaling = {"default": float(scaling)}
        self.active_adapters = ["default"]
        self.disable_adapters = False
        self.merged = False
        self.in_features, self.out_features = a.shape[1], b.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.disable_adapters:
            return y
        return y + self.lora_B["default"](self.lora_A["default"](x)) * self.scaling["default"]


def _adapter_config(directory: Path) -> dict:
    path = directory / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{str(path)!r}: not a readable adapter config ({err})") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{str(path)!r}: expected a LoRA adapter config (peft_type 'LORA')")
    for key, ok in (("use_dora", False), ("fan_in_fan_out", False), ("bias", "none")):
        if config.get(key, ok) != ok:
            raise ValueError(f"{str(path)!r}: {key}={config[key]!r}; the lean model loads plain LoRA ({key}={ok!r})")
    for key in ("rank_pattern", "alpha_pattern", "layers_to_transform", "modules_to_save"):
        if config.get(key):
            raise ValueError(f"{str(path)!r}: {key} is set; the lean model loads one rank and alpha for every layer")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1 or not isinstance(alpha, (int, float)):
        raise ValueError(f"{str(path)!r}: r={rank!r}, lora_alpha={alpha!r}; expected an integer r >= 1 and a number")
    return config


def _targets(model: nn.Module, target_modules) -> list[str]:
    names = [name for name, m in model.named_modules() if type(m) is not LoraLinear and hasattr(m, "in_features")
             and hasattr(m, "out_features") and ".layers." in f".{name}"]
    if isinstance(target_modules, str):
        return [n for n in names if re.fullmatch(target_modules, n)]
    wanted = set(target_modules or ())
    return [n for n in names if n.rsplit(".", 1)[-1] in wanted]


def attach_adapter(model: LlamaForCausalLM, directory) -> LlamaForCausalLM:
    """Put the LoRA adapter saved by peft in ``directory`` beside ``model``'s layers (in place; returns it).
    Every weight is checked: present for every target, shaped for its layer, finite."""
    directory = Path(directory)
    if model.lora_config is not None:
        raise ValueError("this model has a LoRA adapter already")
    config = _adapter_config(directory)
    rank, alpha = config["r"], config["lora_alpha"]
    scaling = alpha / (rank ** 0.5) if config.get("use_rslora") else alpha / rank
    path = directory / ADAPTER_WEIGHTS
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises several error types for a damaged file
        raise ValueError(f"{str(path)!r}: not a readable safetensors file ({err})") from None
    targets = _targets(model, config.get("target_modules"))
    if not targets:
        raise ValueError(f"{str(directory)!r}: target_modules {config.get('target_modules')!r} match no layer")
    used = set()
    modules = dict(model.named_modules())
    for name in targets:
        keys = [f"{_PEFT_PREFIX}{name}.lora_A.weight", f"{_PEFT_PREFIX}{name}.lora_B.weight"]
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise ValueError(f"{str(path)!r}: no tensor {missing[0]!r}")
        a, b = (tensors[k].float() for k in keys)
        base = modules[name]
        if a.shape != (rank, base.in_features) or b.shape != (base.out_features, rank):
            raise ValueError(f"{str(path)!r}: {name}'s adapter is {tuple(a.shape)} / {tuple(b.shape)}; expected "
                             f"{(rank, base.in_features)} / {(base.out_features, rank)}")
        for key, value in zip(keys, (a, b)):
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"{str(path)!r}: tensor {key!r} holds NaN or infinite values")
        parent, _, attr = name.rpartition(".")
        setattr(modules[parent], attr, LoraLinear(base, a, b, scaling))
        used.update(keys)
    extra = sorted(set(tensors) - used)
    if extra:
        raise ValueError(f"{str(path)!r}: tensors {extra[:3]} belong to no target layer")
    model.lora_config = config
    model.model.engine_owner.clear()
    return model
