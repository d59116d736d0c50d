"""Weight-only low-precision linear layers: ``QuantLinear`` and the conversion of a whole decoder.

Weights are stored in one of these formats; activations stay float32 and every product is accumulated in float32
against the weights dequantized to float32 (so the only difference from ``F.linear`` over ``dequantize()`` is
float32 rounding):

=========  ==========================================================================  ====================
format     storage (``qweight``)                                                      bits per weight
=========  ==========================================================================  ====================
``fp32``   float32 (N, K)                                                              32
``bf16``   bfloat16 (N, K) (round to nearest even)                                     16
``int8``   int8 (N, K) and float32 ``scale`` (N,): w = q scale, q = round(w / scale),  8 (+ 32 per row)
           scale = max |w| / 127 per row
``q4``     llama.cpp ``block_q4_1``: uint8 (N, ceil(K / 32) * 20), per block of 32      5
           along K an fp16 scale d, an fp16 minimum m and 16 bytes of nibbles (element
           j < 16 in the low nibble of byte j, j + 16 in its high nibble); w = d q + m
``q8``     llama.cpp ``block_q8_0``: uint8 (N, ceil(K / 32) * 34), fp16 d and 32 int8   8.5
           per block; w = d q
=========  ==========================================================================  ====================

When K is not a multiple of 32, the last block of each row is partial: it is padded (by repeating the row's last
value, so the block's minimum and maximum are those of its real elements) and the padding is never read.

``q4`` converts a decoder's projections to Q4_1 and its LM head (with the tied input embedding) to Q8_0.  For the
default backbone the blocks are the GGUF's own tensors, read as stored (its projections are Q4_1 and its tied
token embedding Q8_0), so the q4 model is lossless against the fp32 model, whose weights are those same blocks
dequantized.  Other backbones are quantized at load: per block of 32, m = the block's minimum and
d = (max - min) / 15, both rounded to fp16, then q = round((w - m) / d) clamped to [0, 15] (Q8_0:
d = max |w| / 127, q = round(w / d)).

The products run in the native op ``torch.ops.hmt.linear`` (csrc/cpu/linear.cpp), built for AVX-512, AVX2 and
the portable target and chosen at run time (``isa()``, ``set_isa()``; ``HMT_ISA=avx512|avx2|scalar``); from 32
rows of x on (prefill) it multiplies panels of dequantized weights with torch's float32 GEMM.  One exception:
``bf16`` weights with 32 rows of x or more, on a CPU with bfloat16 dot-product instructions (AVX512-BF16 or
AMX-BF16, ``bf16_gemm()``), run torch's bfloat16 GEMM (oneDNN) on x rounded to bfloat16, float32 accumulation,
bias added in float32: the precision a bf16 model runs at everywhere else, at about 2.4x the float32 GEMM's speed
on such CPUs (``HMT_BF16_GEMM=0`` turns it off, ``=1`` forces it).  Without
the extension, on another device, or for float64 inputs and inputs that record autograd, ``QuantLinear`` runs
``F.linear`` on the dequantized weight (correct, slower).

Integer dot products (``QuantLinear.int_dot``, kernel formats ``q4_1:i8`` / ``q8_0:i8``): below 32 rows of x
(decode, batched decode; from 4 rows the bfloat16 products instead where the CPU has them), q4 and q8 layers can
quantize x to int8 per block of 32 (d = max |x| / 127, q = round(x / d)) and take integer dot products against the
blocks, as llama.cpp does: Q4_1 gives d_w d_x sum(q_w q_x) + m_w d_x sum(q_x), Q8_0 d_w d_x sum(q_w q_x), the
integer sums exact, the block terms summed in float32 (AVX-512 VNNI, AVX2, portable builds). The error is that of
x's quantization, at most sum |w| d_x / 2 per output. ``load_backbone`` turns them on for the layers it quantizes
unless ``HMT_INT_DOT=0`` (``int_dot_default()``); ``set_int_dot(module, on)`` switches a loaded model.
benchmarks/quality_int_dot.py measures what they cost in perplexity and greedy tokens.

Over 500 lines: the formats, their layers and their loaders share the block layouts.
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

WEIGHT_FORMATS = ("fp32", "bf16", "int8", "q4")  # what load_backbone(weights=...) accepts
STORAGE_FORMATS = ("fp32", "bf16", "int8", "q4", "q8")  # what a QuantLinear can hold
_KERNEL_FORMAT = {"fp32": "fp32", "bf16": "bf16", "int8": "int8", "q4": "q4_1", "q8": "q8_0"}
BLOCK = 32
_BLOCK_BYTES = {"q4": 20, "q8": 34}
_warned: set[str] = set()


def check_format(fmt: str, allowed=STORAGE_FORMATS, name: str = "weight_format") -> str:
    if fmt not in allowed:
        raise ValueError(f"{name}={fmt!r}: expected one of {', '.join(map(repr, allowed))}")
    return fmt


# ------------------------------------------------------------------------------------------ the native op
BF16_GEMM_ROWS = 32  # rows of x from which bf16 weights use the bfloat16 GEMM (where bf16_gemm())


@functools.lru_cache(maxsize=None)
def _cpu_has_bf16_dot() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def bf16_gemm() -> bool:
    """Whether bf16-weight layers run prefill chunks on torch's bfloat16 GEMM (module docstring)."""
    env = os.environ.get("HMT_BF16_GEMM", "")
    if env in ("0", "1"):
        return env == "1"
    return _cpu_has_bf16_dot()


@functools.lru_cache(maxsize=None)
def _native() -> bool:
    """Whether torch.ops.hmt.linear is available (the extension is loaded once, by ``kernels``)."""
    from . import kernels as native

    return native.available() and hasattr(torch.ops.hmt, "linear")


def _extension():
    from . import kernels as native

    module = native._extension()  # ImportError with the reason when the extension cannot be loaded
    if not hasattr(torch.ops.hmt, "linear"):
        raise ImportError("the native extension hmt_runtime._C has no torch.ops.hmt.linear; rebuild it with "
                          "`pip install -e . --no-build-isolation`")
    return module


def isa() -> str:
    """The instruction-set build of the linear kernels in use: "avx512", "avx2" or "scalar"."""
    return _extension().build_info()["linear_isa"]


def isas() -> list[str]:
    """The builds this CPU can run, best first (e.g. ["avx512", "avx2", "scalar"])."""
    return list(_extension().build_info()["linear_isas"])


def set_isa(name: str) -> None:
    """Run the linear kernels with the given build (ValueError when it is missing or the CPU cannot run it)."""
    _extension().set_linear_isa(name)


@contextlib.contextmanager
def use_isa(name: str):
    """Context manager: the linear kernels use build ``name`` inside, the previous one after."""
    previous = isa()
    set_isa(name)
    try:
        yield
    finally:
        set_isa(previous)


def int_dot_default() -> bool:
    """Whether new q4 / q8 layers take the integer dot products (``QuantLinear.int_dot``): yes unless the
    environment sets ``HMT_INT_DOT=0``."""
    return os.environ.get("HMT_INT_DOT", "1") != "0"


def set_int_dot(module: nn.Module, enabled: bool) -> int:
    """Set ``int_dot`` on every q4 / q8 ``QuantLinear`` under ``module`` (itself included); returns how many.
    Engines built before the change keep what they packed: build them again (a new ``generate`` call does)."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled={enabled!r}: expected True or False")
    count = 0
    for layer in module.modules():
        if isinstance(layer, QuantLinear) and layer.weight_format in ("q4", "q8"):
            layer.int_dot = enabled
            count += 1
    return count


# ------------------------------------------------------------------------------------ (de)quantization
def _pad_blocks(weight: torch.Tensor) -> torch.Tensor:
    """(N, K) float32 -> (N, nb, 32), the last block padded with the row's last value."""
    n, k = weight.shape
    pad = (-k) % BLOCK
    if pad:
        weight = torch.cat([weight, weight[:, -1:].expand(n, pad)], dim=1)
    return weight.reshape(n, -1, BLOCK)


def _half_bytes(values: torch.Tensor) -> torch.Tensor:
    """float16 (...,) -> uint8 (..., 2), little-endian as stored in GGUF blocks."""
    return values.contiguous().view(torch.uint8).reshape(*values.shape, 2)


def quantize_q4_1(weight: torch.Tensor) -> torch.Tensor:
    """weight (N, K) float -> Q4_1 blocks uint8 (N, ceil(K / 32) * 20): per block m = min, d = (max - min) / 15
    (fp16), q = round((w - m) / d) in [0, 15]."""
    blocks = _pad_blocks(weight.detach().float())
    lo, hi = blocks.amin(dim=-1), blocks.amax(dim=-1)
    m = lo.half()
    d = ((hi - m.float()) / 15).half()
    d32 = d.float()
    inv = torch.where(d32 > 0, 1.0 / d32, torch.zeros_like(d32))
    q = torch.round((blocks - m.float()[..., None]) * inv[..., None]).clamp_(0, 15).to(torch.uint8)
    nibbles = q[..., :16] | (q[..., 16:] << 4)
    out = torch.cat([_half_bytes(d), _half_bytes(m), nibbles], dim=-1)
    return out.reshape(weight.shape[0], -1).contiguous()


def dequantize_q4_1(qweight: torch.Tensor, in_features: int) -> torch.Tensor:
    """Q4_1 blocks uint8 (N, nb * 20) -> float32 (N, in_features): w = d q + m."""
    n = qweight.shape[0]
    blocks = qweight.reshape(n, -1, 20)
    d = blocks[..., 0:2].contiguous().view(torch.float16).float()
    m = blocks[..., 2:4].contiguous().view(torch.float16).float()
    qs = blocks[..., 4:]
    q = torch.cat([qs & 15, qs >> 4], dim=-1).float()
    return (q * d + m).reshape(n, -1)[:, :in_features].contiguous()


def quantize_q8_0(weight: torch.Tensor) -> torch.Tensor:
    """weight (N, K) float -> Q8_0 blocks uint8 (N, ceil(K / 32) * 34): d = max |w| / 127 (fp16), q = round(w / d)."""
    blocks = _pad_blocks(weight.detach().float())
    d = (blocks.abs().amax(dim=-1) / 127).half()
    d32 = d.float()
    inv = torch.where(d32 > 0, 1.0 / d32, torch.zeros_like(d32))
    q = torch.round(blocks * inv[..., None]).clamp_(-127, 127).to(torch.int8)
    out = torch.cat([_half_bytes(d), q.view(torch.uint8)], dim=-1)
    return out.reshape(weight.shape[0], -1).contiguous()


def dequantize_q8_0(qweight: torch.Tensor, in_features: int) -> torch.Tensor:
    """Q8_0 blocks uint8 (N, nb * 34) -> float32 (N, in_features): w = d q."""
    n = qweight.shape[0]
    blocks = qweight.reshape(n, -1, 34)
    d = blocks[..., 0:2].contiguous().view(torch.float16).float()
    q = blocks[..., 2:].contiguous().view(torch.int8).float()
    return (q * d).reshape(n, -1)[:, :in_features].contiguous()


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (N, K) -> (q int8 (N, K), scale float32 (N,)): scale = max |w| / 127 per row, q = round(w / scale)."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / 127
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    q = torch.round(w * inv[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def _dequantize_rows(fmt: str, qweight: torch.Tensor, scale: torch.Tensor | None, in_features: int) -> torch.Tensor:
    if fmt == "fp32":
        return qweight.float()
    if fmt == "bf16":
        return qweight.float()
    if fmt == "int8":
        return qweight.float() * scale[:, None]
    if fmt == "q4":
        return dequantize_q4_1(qweight, in_features)
    return dequantize_q8_0(qweight, in_features)


# ----------------------------------------------------------------------------------------------- modules
class QuantLinear(nn.Module):
    """y = x W^T + b with W stored in ``weight_format`` (see the module docstring); inference only for W.

    Attributes: in_features (K), out_features (N), weight_format, qweight (the stored weight), scale (int8: (N,)
    float32, else None), bias ((N,) float32 or None).  ``forward(x)``: x (..., K) -> (..., N) in x's dtype.
    ``dequantize()``: the float32 (N, K) weight the products use.
    """

    def __init__(self, in_features: int, out_features: int, weight_format: str, qweight: torch.Tensor,
                 scale: torch.Tensor | None = None, bias: torch.Tensor | None = None, int_dot: bool = False):
        super().__init__()
        check_format(weight_format)
        if not isinstance(int_dot, bool):
            raise TypeError(f"int_dot={int_dot!r}: expected True or False")
        self.int_dot = int_dot and weight_format in ("q4", "q8")
        self.in_features, self.out_features, self.weight_format = int(in_features), int(out_features), weight_format
        expected = {
            "fp32": (torch.float32, in_features), "bf16": (torch.bfloat16, in_features),
            "int8": (torch.int8, in_features),
            "q4": (torch.uint8, -(-in_features // BLOCK) * 20), "q8": (torch.uint8, -(-in_features // BLOCK) * 34),
        }[weight_format]
        if qweight.dtype != expected[0] or tuple(qweight.shape) != (out_features, expected[1]):
            raise ValueError(f"qweight has dtype {qweight.dtype} and shape {tuple(qweight.shape)}: format "
                             f"{weight_format!r} expects {expected[0]} ({out_features}, {expected[1]})")
        if (scale is not None) != (weight_format == "int8"):
            raise ValueError(f"scale: format {weight_format!r} {'needs' if weight_format == 'int8' else 'takes no'} "
                             "per-row scales")
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}: expected ({out_features},)")
        self.register_buffer("qweight", qweight.detach().contiguous())
        self.register_buffer("scale", None if scale is None else scale.detach().float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())

    @property
    def kernel_format(self) -> str:
        """The format name of ``torch.ops.hmt.linear``: fp32, bf16, int8, q4_1 or q8_0, with ":i8" for a q4 / q8
        layer with ``int_dot`` (x quantized to int8 per block of 32, integer dot products, below 32 rows of x)."""
        return _KERNEL_FORMAT[self.weight_format] + (":i8" if self.int_dot else "")

    def nbytes(self) -> int:
        """Bytes of weight storage (qweight, scale, bias)."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scale, self.bias) if t is not None)

    def dequantize(self) -> torch.Tensor:
        """The weight as float32 (N, K), exactly as the kernels see it."""
        return _dequantize_rows(self.weight_format, self.qweight, self.scale, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x has shape {tuple(x.shape)}: expected (..., {self.in_features})")
        fast = (x.device.type == "cpu" and self.qweight.device.type == "cpu"
                and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
                and not (torch.is_grad_enabled() and x.requires_grad) and _native())
        if not fast:
            if x.device.type == "cpu" and x.dtype == torch.float32 and not _native() and "native" not in _warned:
                _warned.add("native")
                warnings.warn("QuantLinear: the native extension is not available; running F.linear on the "
                              "dequantized weight (slow)", stacklevel=2)
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.dequantize().to(x.dtype), bias)
        if (self.weight_format == "bf16" and x.numel() >= BF16_GEMM_ROWS * self.in_features and bf16_gemm()):
            y = F.linear(x.to(torch.bfloat16), self.qweight).float()
            if self.bias is not None:
                y += self.bias
            return y.to(x.dtype)
        y = torch.ops.hmt.linear(x.float() if x.dtype != torch.float32 else x, self.qweight, self.scale,
                                 self.bias, self.kernel_format)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def _apply(self, fn, recurse=True):
        # Device moves apply; dtype casts (model.to(torch.bfloat16), .half(), ...) would change the storage
        # format, so the stored tensors keep their dtype.
        for key, tensor in self._buffers.items():
            if tensor is not None:
                moved = fn(tensor)
                if moved.dtype != tensor.dtype:
                    moved = tensor.to(device=moved.device)
                self._buffers[key] = moved
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"weight_format={self.weight_format!r}, bias={self.bias is not None}"
                + (", int_dot=True" if self.int_dot else ""))


class QuantEmbedding(nn.Module):
    """An embedding lookup that reads the rows of a ``QuantLinear`` (a tied LM head), dequantized to float32,
    so input embeddings and output logits use the same stored weights.  forward(ids (...,)) -> (..., d).

    ``weight`` dequantizes the whole table (float32 (V, d)): for code that inspects it, not for the hot path.
    """

    def __init__(self, table: QuantLinear, padding_idx: int | None = None):
        super().__init__()
        self.table = table  # shared with the LM head: one copy of the stored weight
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features
        self.padding_idx = padding_idx

    @property
    def weight(self) -> torch.Tensor:
        return self.table.dequantize()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = self.table
        flat = ids.reshape(-1)
        scale = None if t.scale is None else t.scale[flat]
        rows = _dequantize_rows(t.weight_format, t.qweight[flat], scale, t.in_features)
        return rows.reshape(*ids.shape, t.in_features)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, weight_format={self.table.weight_format!r}"


def quantize_linear(linear: nn.Linear, fmt: str) -> QuantLinear:
    """A QuantLinear holding ``linear``'s weight (N, K) in format ``fmt`` (fp32, bf16, int8, q4 or q8)."""
    check_format(fmt, name="fmt")
    weight = linear.weight.detach()
    n, k = weight.shape
    bias = None if linear.bias is None else linear.bias.detach().float()
    return from_weight(weight, fmt, bias)


def from_weight(weight: torch.Tensor, fmt: str, bias: torch.Tensor | None = None) -> QuantLinear:
    """A QuantLinear for the float weight (N, K) in format ``fmt``."""
    check_format(fmt, name="fmt")
    n, k = weight.shape
    w = weight.detach()
    if fmt == "fp32":
        return QuantLinear(k, n, fmt, w.float().clone(), bias=bias)
    if fmt == "bf16":
        return QuantLinear(k, n, fmt, w.to(torch.bfloat16), bias=bias)
    if fmt == "int8":
        q, scale = quantize_int8(w)
        return QuantLinear(k, n, fmt, q, scale=scale, bias=bias)
    if fmt == "q4":
        return QuantLinear(k, n, fmt, quantize_q4_1(w), bias=bias)
    return QuantLinear(k, n, fmt, quantize_q8_0(w), bias=bias)


# ---------------------------------------------------------------------------------------- the GGUF's blocks
_GGUF_LAYER = re.compile(r"^blk\.(\d+)\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight$")
_GGUF_TO_HF = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj"}
_GGUF_STORED = {"Q4_1": "q4", "Q8_0": "q8"}  # block types the kernels read as stored


def gguf_linear_weights(path, num_heads: int, num_kv_heads: int) -> dict[str, tuple[str, torch.Tensor]]:
    """The linear weights of a Llama-architecture GGUF, by transformers parameter name.

    Returns {name: (ggml type name, tensor)} for "model.layers.{i}.self_attn.q_proj.weight", ... and
    "model.embed_tokens.weight" / "lm_head.weight": Q4_1 and Q8_0 tensors as their stored blocks (uint8 (N,
    row bytes)), others as None (the caller quantizes the fp32 weight).  The rows of q and k are put back in
    transformers' order (GGUF stores them permuted for its rotary layout; a row permutation is lossless)."""
    out: dict[str, tuple[str, torch.Tensor | None]] = {}
    with open(path, "rb") as stream:
        for tensor_name, kind, shape, offset in gguf_tensor_table(stream, path):
            match = _GGUF_LAYER.match(tensor_name)
            if match:
                name = f"model.layers.{match.group(1)}.{_GGUF_TO_HF[match.group(2)]}.weight"
            elif tensor_name == "token_embd.weight":
                name = "model.embed_tokens.weight"
            elif tensor_name == "output.weight":
                name = "lm_head.weight"
            else:
                continue
            if kind not in _GGUF_STORED or len(shape) != 2:
                out[name] = (kind, None)
                continue
            k, n = shape
            data = torch.empty((n, -(-k // BLOCK) * _BLOCK_BYTES[_GGUF_STORED[kind]]), dtype=torch.uint8)
            stream.seek(offset)
            if stream.readinto(data.numpy()) != data.numel():
                raise ValueError(f"{str(path)!r}: tensor {tensor_name!r} is cut short (a damaged GGUF file)")
            heads = num_heads if match and match.group(2) == "attn_q" else num_kv_heads
            if match and match.group(2) in ("attn_q", "attn_k"):
                # GGUF row r of head h is HF row ... : undo llama.cpp's permute (as transformers does for floats).
                half = n // heads // 2
                data = data.reshape(heads, half, 2, -1).transpose(1, 2).reshape(n, -1).contiguous()
            out[name] = (kind, data)
    return out


_GGML_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1"}
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def gguf_tensor_table(stream, path="GGUF file") -> list[tuple[str, str, tuple[int, ...], int]]:
    """The tensor table of a GGUF file (versions 2 and 3) open in ``stream``: (name, ggml type name, shape as
    GGUF lists it (ne0 = the row length first), absolute byte offset of the data) per tensor.  The metadata is
    skipped, not parsed (the gguf package's reader builds Python objects for the whole tokenizer: ~180 MB)."""
    import struct

    def read(fmt: str):
        size = struct.calcsize("<" + fmt)
        raw = stream.read(size)
        if len(raw) != size:
            raise ValueError(f"{str(path)!r}: the GGUF header is cut short")
        return struct.unpack("<" + fmt, raw)

    def string() -> str:
        (length,) = read("Q")
        return stream.read(length).decode("utf-8", errors="replace")

    def skip_value(kind: int) -> None:
        if kind == 8:
            (length,) = read("Q")
            stream.seek(length, 1)
        elif kind == 9:
            inner, count = read("IQ")
            if inner in _GGUF_SCALARS:
                stream.seek(struct.calcsize("<" + _GGUF_SCALARS[inner]) * count, 1)
            else:
                for _ in range(count):
                    skip_value(inner)
        elif kind in _GGUF_SCALARS:
            stream.seek(struct.calcsize("<" + _GGUF_SCALARS[kind]), 1)
        else:
            raise ValueError(f"{str(path)!r}: unknown GGUF metadata type {kind}")

    magic = stream.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{str(path)!r} is not a GGUF file (magic {magic!r})")
    (version,) = read("I")
    if version not in (2, 3):
        raise ValueError(f"{str(path)!r}: GGUF version {version}; expected 2 or 3")
    n_tensors, n_kv = read("QQ")
    alignment = 32
    for _ in range(n_kv):
        key = string()
        (kind,) = read("I")
        if key == "general.alignment" and kind == 4:
            (alignment,) = read("I")
        else:
            skip_value(kind)
    infos = []
    for _ in range(n_tensors):
        name = string()
        (dims,) = read("I")
        shape = read("Q" * dims)
        kind, offset = read("IQ")
        infos.append((name, _GGML_TYPES.get(kind, f"type{kind}"), tuple(shape), offset))
    start = -(-stream.tell() // alignment) * alignment
    return [(name, kind, shape, start + offset) for name, kind, shape, offset in infos]


# ---------------------------------------------------------------------------------- whole-model conversion
def _targets(module: nn.Module, prefix: str = ""):
    """(parent, attribute, nn.Linear, name) for the plain nn.Linear layers under ``module``; for a peft LoRA
    layer, its base layer (named as the layer, without "base_layer"), never the adapters' own linears."""
    for child_name, child in module.named_children():
        name = f"{prefix}{child_name}"
        base = getattr(child, "base_layer", None)
        if base is not None and hasattr(child, "lora_A"):
            if type(base) is nn.Linear:
                yield child, "base_layer", base, name
            continue
        if type(child) is nn.Linear:
            yield module, child_name, child, name
        else:
            yield from _targets(child, f"{name}.")


def quantize_model(backbone: nn.Module, fmt: str, gguf=None, head_format: str | None = None,
                   int_dot: bool | None = None, require_gguf: bool = False) -> dict[str, str]:
    """Convert, in place, every nn.Linear of a transformers causal LM's decoder body and its LM head to a
    QuantLinear in format ``fmt`` ("fp32", "bf16", "int8" or "q4"), freeing the float weights.

    The LM head takes ``head_format`` (default: "q8" for fmt "q4", else fmt); a head tied to the input embedding
    (as in SmolLM2) becomes one QuantLinear that a ``QuantEmbedding`` reads for the lookups, so both use the same
    stored weight.  An untied input embedding is left as it is.  ``gguf``: a Llama-architecture GGUF file whose
    Q4_1 / Q8_0 tensors are these weights quantized (the default backbone's): for fmt "q4", linears stored as
    Q4_1 and the head stored as Q8_0 are taken from it as stored; any other stored type is quantized from the
    float weight.  Works on a peft model too (a LoRA layer's base layer is replaced, its adapters kept).

    ``int_dot`` (None: ``int_dot_default()``): q4 / q8 layers take the integer dot products at decode
    (``QuantLinear.int_dot``).  ``require_gguf``: every converted weight must come from ``gguf`` as stored (a
    backbone built on the meta device has no float weights to quantize).

    Returns {parameter name: storage format} of what was converted ("q4 (gguf)" when read from the GGUF).
    """
    check_format(fmt, WEIGHT_FORMATS, name="weights")
    head_format = check_format(head_format or ("q8" if fmt == "q4" else fmt), name="head_format")
    from ..core.backbones import unwrap

    inner = unwrap(backbone)
    stored = {}
    if gguf is not None and fmt == "q4":
        config = inner.config
        stored = gguf_linear_weights(gguf, config.num_attention_heads,
                                     getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    report: dict[str, str] = {}

    def convert(linear: nn.Linear, name: str, want: str) -> QuantLinear:
        kind, blocks = stored.get(f"{name}.weight", (None, None))
        bias = None if linear.bias is None else linear.bias.detach().float()
        if blocks is not None and _GGUF_STORED[kind] in ("q4", "q8") and (want == _GGUF_STORED[kind]):
            n, k = linear.weight.shape
            q = QuantLinear(k, n, want, blocks, bias=bias)
            report[f"{name}.weight"] = f"{want} (gguf {kind})"
            return q
        if require_gguf:
            raise ValueError(f"{name}.weight: the GGUF holds it as {kind or 'nothing'}, not {want}; load the float "
                             "model and quantize it instead")
        q = from_weight(linear.weight, want, bias)
        report[f"{name}.weight"] = want
        return q

    head = inner.get_output_embeddings()
    embed = inner.get_input_embeddings()
    tied = (isinstance(head, nn.Linear) and isinstance(embed, nn.Embedding)
            and (head.weight is embed.weight or (not head.weight.is_meta
                                                 and head.weight.data_ptr() == embed.weight.data_ptr())))
    body_prefix = next((n for n, m in inner.named_children() if m is inner.base_model), "model")
    for parent, attr, linear, name in list(_targets(inner.base_model, f"{body_prefix}.")):
        setattr(parent, attr, convert(linear, name, fmt))
    if isinstance(head, nn.Linear):
        head_name = next(n for n, m in inner.named_modules() if m is head)
        # the tied table is stored under the embedding's name in the GGUF
        source_name = f"{body_prefix}.embed_tokens" if tied and f"{head_name}.weight" not in stored else head_name
        quant_head = convert(head, source_name, head_format)
        if source_name != head_name:
            report[f"{head_name}.weight"] = report.pop(f"{source_name}.weight")
        inner.set_output_embeddings(quant_head)
        if tied:
            inner.set_input_embeddings(QuantEmbedding(quant_head, padding_idx=embed.padding_idx))
            report[f"{head_name}.weight"] += " (tied: also the input embedding)"
    set_int_dot(inner, int_dot_default() if int_dot is None else int_dot)
    inner.hmt_weights = fmt
    return report


def weight_bytes(backbone: nn.Module) -> int:
    """Bytes of all parameters and buffers of a model, each stored tensor counted once."""
    seen, total = set(), 0
    for t in list(backbone.parameters()) + list(backbone.buffers()):
        key = (t.data_ptr(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


# ----------------------------------------------------------------------------------------------------- peft
@functools.lru_cache(maxsize=None)
def lora_layer_class():
    """peft's LoRA ``Linear`` over a QuantLinear base: y = base(x) + lora_B(lora_A(x)) * scaling, the adapters
    kept beside the stored weight (never merged into it)."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    class LoraQuantLinear(LoraLinear):
        def _get_in_out_features(self, module):
            return module.in_features, module.out_features

        def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
            raise NotImplementedError("LoRA adapters over a QuantLinear stay unmerged: the low-rank product is "
                                      "added beside the quantized weight")

    LoraQuantLinear.__name__ = LoraQuantLinear.__qualname__ = "LoraQuantLinear"
    return LoraQuantLinear


def load_adapter(backbone: nn.Module, adapter_dir, **kwargs):
    """``peft.PeftModel.from_pretrained(backbone, adapter_dir)``, also when the adapters' target layers are
    QuantLinear (registered with peft as a custom LoRA module)."""
    from peft import PeftConfig, PeftModel

    config = PeftConfig.from_pretrained(str(adapter_dir))
    if any(isinstance(m, QuantLinear) for m in backbone.modules()):
        config._register_custom_module({QuantLinear: lora_layer_class()})
    return PeftModel.from_pretrained(backbone, Path(adapter_dir), config=config, **kwargs)
