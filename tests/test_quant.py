"""Weight-only low-precision linear layers (hmt_runtime.native.quant, torch.ops.hmt.linear).

Every kernel format runs in every instruction-set build this CPU has (avx512, avx2, scalar) against a float64
reference computed from the dequantized weights, on fresh random inputs (the seed is in each failure message)
with odd sizes: N not a multiple of the weight-row tile, K not a multiple of the vector width, Q4_1 / Q8_0 rows
whose last block is partial (padded), M in {1, 3, 17} and blocks of rows beyond 64.  The bound is the worst-case
error of a float32 sum of K products, (K + 2) u sum_k |x_k w_k| (+ |b|), u = 2^-24.
"""
import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hmt_runtime.native import kernels as native
from hmt_runtime.native import quant
from hmt_runtime.model import lean

needs_native = pytest.mark.skipif(not native.available() or not quant._native(),
                                  reason="the native extension hmt_runtime._C is not built")
FORMATS = ("fp32", "bf16", "int8", "q4", "q8")
U = 2.0 ** -24


def _isas():
    return quant.isas() if native.available() and quant._native() else []


@pytest.fixture
def fresh_seed():
    return int.from_bytes(os.urandom(4), "little")


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _check_close(y, x, w64, bias, seed, what):
    """y (M, N) against x (M, K) @ w64^T (+ bias) in float64 within the float32 summation bound."""
    x64 = x.double()
    ref = x64 @ w64.T
    magnitude = x64.abs() @ w64.abs().T
    if bias is not None:
        ref = ref + bias.double()
        magnitude = magnitude + bias.double().abs()
    bound = (x.shape[-1] + 2) * U * magnitude + 1e-30
    err = (y.double() - ref).abs()
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"{what} (seed {seed}): error {err.max().item():.3g} is {worst:.2f}x the fp32 bound"


# ---------------------------------------------------------------------------------------------- kernels
@needs_native
@pytest.mark.parametrize("isa", ["avx512", "avx2", "scalar"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_kernel_against_float64(fmt, isa, fresh_seed):
    if isa not in _isas():
        pytest.skip(f"this CPU or build has no {isa} kernels (has {_isas()})")
    g = torch.Generator().manual_seed(fresh_seed)
    ks = (96, 75, 200) if fmt in ("q4", "q8") else (75, 200, 33)  # 75, 200: partial last blocks for q4 / q8
    with quant.use_isa(isa):
        assert quant.isa() == isa
        for k in ks:
            for n in (37, 5):
                weight = torch.randn(n, k, generator=g) * 0.1
                bias = torch.randn(n, generator=g) if n == 37 else None
                layer = quant.from_weight(weight, fmt, bias)
                w64 = layer.dequantize().double()
                for m in (1, 3, 17):
                    x = torch.randn(m, k, generator=g)
                    y = torch.ops.hmt.linear(x, layer.qweight, layer.scale, layer.bias, layer.kernel_format)
                    _check_close(y, x, w64, bias, fresh_seed, f"{fmt}/{isa} M={m} N={n} K={k}")
                    assert torch.equal(layer(x), y)


def _quantized_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's per-block int8 quantization of x (M, K) float32, emulated in float32 as the kernels compute
    it: (x_hat = d q as float64 (M, K), d per element (M, K))."""
    m, k = x.shape
    pad = (-k) % 32
    blocks = F.pad(x, (0, pad)).reshape(m, -1, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    d = amax / 127.0
    # 127 / amax as one float32 division, as the kernels compute it (a Python number over a tensor is the
    # reciprocal times the number in torch: an ulp off, which moves a product near .5 to the other integer)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    q = torch.round(blocks * inv).clamp(-127, 127)
    x_hat = (d.double() * q.double()).reshape(m, -1)[:, :k]
    return x_hat, d.expand_as(blocks).reshape(m, -1)[:, :k].double()


@needs_native
@pytest.mark.parametrize("isa", ["avx512", "avx2", "scalar"])
@pytest.mark.parametrize("fmt", ["q4", "q8"])
def test_integer_dot_products_against_float64(fmt, isa, fresh_seed, threads, monkeypatch):
    """The ":i8" formats (x quantized to int8 per block of 32, integer dot products): equal to the float64
    product of the quantized x within the float32 summation bound, and to the float64 product of x itself within
    the quantization bound sum |w| d / 2; odd K (partial last blocks), N beyond a thread's rows, M below, at and
    past the 4-row switch to the bfloat16 products (off here: without them the integer dots run up to 31 rows)."""
    if isa not in _isas():
        pytest.skip(f"this CPU or build has no {isa} kernels (has {_isas()})")
    monkeypatch.setenv("HMT_BF16_GEMM", "0")  # no bfloat16 products from 4 rows (they are tested below)
    g = torch.Generator().manual_seed(fresh_seed)
    threads(2)
    with quant.use_isa(isa):
        for k in (96, 75, 200, 33):
            for n in (37, 5, 1001):
                weight = torch.randn(n, k, generator=g) * 0.1
                bias = torch.randn(n, generator=g) if n != 5 else None
                exact = quant.from_weight(weight, fmt, bias)
                layer = quant.from_weight(weight, fmt, bias)
                assert quant.set_int_dot(layer, True) == 1 and layer.kernel_format.endswith(":i8")
                w64 = layer.dequantize().double()
                for m in (1, 2, 3, 4, 6, 9):
                    x = torch.randn(m, k, generator=g) * torch.rand(1, k, generator=g) * 4
                    x[:, k // 3] = 0.0  # a zero element; and a row of zeros (a block with amax 0)
                    if m == 3:
                        x[1] = 0.0
                    y = layer(x)
                    what = f"{fmt}:i8/{isa} M={m} N={n} K={k}"
                    x_hat, d = _quantized_activations(x)
                    ref = x_hat @ w64.T + (0 if bias is None else bias.double())
                    magnitude = x_hat.abs() @ w64.abs().T + (0 if bias is None else bias.double().abs())
                    err = (y.double() - ref).abs()
                    tight = (4 * (k + 2) * U * magnitude + 1e-30)
                    assert (err <= tight).all(), f"{what} (seed {fresh_seed}): {(err / tight).max():.2f}x the bound"
                    true = x.double() @ w64.T + (0 if bias is None else bias.double())
                    loose = 0.5 * d @ w64.abs().T + tight
                    assert ((y.double() - true).abs() <= loose).all(), f"{what} (seed {fresh_seed})"
                    if m == 1 and n == 37:
                        assert not torch.equal(y, exact(x)), f"{what}: the integer path was not taken"


@needs_native
@pytest.mark.parametrize("fmt", FORMATS)
def test_kernel_threads_and_row_blocks(fmt, fresh_seed, threads, monkeypatch):
    """Outputs split over 2 threads and more than one block of 64 rows of x, in every build."""
    monkeypatch.setenv("HMT_BF16_GEMM", "0")  # the native op for bf16 too (its bfloat16 GEMM path: below)
    g = torch.Generator().manual_seed(fresh_seed)
    n, k, m = 1001, 160, 130
    weight = torch.randn(n, k, generator=g)
    layer = quant.from_weight(weight, fmt, torch.randn(n, generator=g))
    x = torch.randn(m, k, generator=g)
    w64 = layer.dequantize().double()
    threads(2)
    for isa in _isas():
        with quant.use_isa(isa):
            _check_close(layer(x), x, w64, layer.bias, fresh_seed, f"{fmt}/{isa} threaded")
            y1 = layer(x[:1])
            _check_close(y1, x[:1], w64, layer.bias, fresh_seed, f"{fmt}/{isa} threaded M=1")


@needs_native
@pytest.mark.parametrize("fmt", FORMATS)
def test_prefill_gemm_path_against_float64(fmt, fresh_seed, threads, monkeypatch):
    """From 32 rows of x on, the ops dequantize panels of weight rows and use torch's GEMM: several panels
    (K = 1500: panels of 336 rows, a partial last block of 28 elements), a last partial panel, int8 scales and
    bias applied per panel, the row-count threshold from both sides, linear_out into a column slice, and the same
    panels from every instruction-set build."""
    monkeypatch.setenv("HMT_BF16_GEMM", "0")
    g = torch.Generator().manual_seed(fresh_seed)
    n, k = 700, 1500
    layer = quant.from_weight(torch.randn(n, k, generator=g) * 0.05, fmt, torch.randn(n, generator=g))
    w64 = layer.dequantize().double()
    threads(2)
    for m in (31, 32, 45):
        x = torch.randn(m, k, generator=g)
        y = layer(x)
        _check_close(y, x, w64, layer.bias, fresh_seed, f"{fmt} gemm path M={m}")
        buffer = torch.full((m, n + 20), float("nan"))
        torch.ops.hmt.linear_out(x, layer.qweight, layer.scale, layer.bias, layer.kernel_format,
                                 buffer[:, 7:7 + n])
        assert torch.equal(buffer[:, 7:7 + n], y)
        assert buffer[:, :7].isnan().all() and buffer[:, 7 + n:].isnan().all()
    x3 = torch.randn(2, 20, k, generator=g)  # leading dimensions flatten to 40 rows
    _check_close(layer(x3).reshape(40, n), x3.reshape(40, k), w64, layer.bias, fresh_seed, f"{fmt} gemm 3-D")
    outs = []
    for isa in quant.isas():  # every build dequantizes the panels (Q4_1 / Q8_0 vectorised per build) alike
        with quant.use_isa(isa):
            outs.append(layer(x3))
    assert all(torch.equal(outs[0], y) for y in outs[1:]), f"{fmt}: the builds' panels differ"


@needs_native
def test_bf16_weights_prefill_on_the_bfloat16_gemm(fresh_seed, monkeypatch):
    """bf16 weights from 32 rows of x on, with HMT_BF16_GEMM=1 (the default where the CPU has AVX512-BF16 or
    AMX): x rounded to bfloat16 (relative error <= 2^-8 per element), float32 accumulation, bias in float32;
    below 32 rows and with HMT_BF16_GEMM=0, the native op within the plain float32 bound."""
    g = torch.Generator().manual_seed(fresh_seed)
    n, k = 300, 200
    layer = quant.from_weight(torch.randn(n, k, generator=g) * 0.05, "bf16", torch.randn(n, generator=g))
    w64 = layer.dequantize().double()
    for m in (31, 32, 64):
        x = torch.randn(m, k, generator=g)
        monkeypatch.setenv("HMT_BF16_GEMM", "1")
        y = layer(x)
        ref = x.double() @ w64.T + layer.bias.double()
        magnitude = x.double().abs() @ w64.abs().T
        if m < quant.BF16_GEMM_ROWS:
            _check_close(y, x, w64, layer.bias, fresh_seed, f"bf16 M={m} below the threshold")
        else:
            err = (y.double() - ref).abs()
            bound = 2.0 ** -8 * magnitude + (k + 2) * U * (magnitude + layer.bias.double().abs())
            assert (err <= bound).all(), (err / bound).max()
            assert not torch.equal(y, torch.ops.hmt.linear(x, layer.qweight, None, layer.bias, "bf16"))
        monkeypatch.setenv("HMT_BF16_GEMM", "0")
        _check_close(layer(x), x, w64, layer.bias, fresh_seed, f"bf16 M={m} with HMT_BF16_GEMM=0")


@needs_native
@pytest.mark.parametrize("fmt", ["q4", "q8"])
def test_integer_dot_formats_take_bfloat16_products_from_4_rows(fmt, fresh_seed, threads, monkeypatch):
    """The approximate path from 4 rows of x on: a q4 / q8 layer with the integer dots on runs 4-31 rows on the
    bfloat16 tiles (where the build in use has them: AVX512-BF16) and 32 rows and more as bfloat16 GEMMs over
    dequantized panels, with HMT_BF16_GEMM=1 (the default on such CPUs): x, the weights (and the GEMM's outputs)
    rounded to bfloat16 (2^-9 relative each), float32 accumulation, bias in float32; several panels, a partial
    last block (K = 1500), a partial last panel, odd row counts, two threads, a column slice through linear_out.
    Without the tiles (other CPUs) and with HMT_BF16_GEMM=0, 4-31 rows keep the integer dots (each row exactly
    what it gets alone) and the panels are float32 (equal to the float32-exact layer)."""
    from hmt_runtime.native import kernels as native

    g = torch.Generator().manual_seed(fresh_seed)
    n, k = 700, 1500
    weight, bias = torch.randn(n, k, generator=g) * 0.05, torch.randn(n, generator=g)
    exact, layer = quant.from_weight(weight, fmt, bias), quant.from_weight(weight, fmt, bias)
    quant.set_int_dot(layer, True)
    w64 = layer.dequantize().double()
    tiles = native.build_info()["linear_bf16"]
    threads(2)
    for m in (4, 5, 6, 8, 13, 31, 32, 45):
        x = torch.randn(m, k, generator=g)
        monkeypatch.setenv("HMT_BF16_GEMM", "1")
        y = layer(x)
        buffer = torch.full((m, n + 9), float("nan"))
        torch.ops.hmt.linear_out(x, layer.qweight, None, layer.bias, layer.kernel_format, buffer[:, 4:4 + n])
        assert torch.equal(buffer[:, 4:4 + n], y) and buffer[:, :4].isnan().all() and buffer[:, 4 + n:].isnan().all()
        one_by_one = torch.cat([layer(x[i:i + 1]) for i in range(m)])
        if m < 32 and not tiles:
            assert torch.equal(y, one_by_one), f"{fmt} M={m}"
            continue
        magnitude = x.double().abs() @ w64.abs().T
        err = (y.double() - (x.double() @ w64.T + bias.double())).abs()
        bound = 2.0 ** -7 * magnitude + (k + 2) * U * (magnitude + bias.double().abs())
        assert (err <= bound).all(), f"{fmt} M={m} (seed {fresh_seed}): {(err / bound).max():.2f}x the bound"
        assert not torch.equal(y, exact(x)), f"{fmt} M={m}: the bfloat16 products were not taken"
        monkeypatch.setenv("HMT_BF16_GEMM", "0")
        assert torch.equal(layer(x), one_by_one if m < 32 else exact(x)), f"{fmt} M={m} with HMT_BF16_GEMM=0"


@needs_native
def test_linear_out_writes_a_column_slice(fresh_seed):
    g = torch.Generator().manual_seed(fresh_seed)
    layer = quant.from_weight(torch.randn(40, 64, generator=g), "q4")
    x = torch.randn(3, 64, generator=g)
    buffer = torch.full((3, 100), float("nan"))
    torch.ops.hmt.linear_out(x, layer.qweight, None, None, "q4_1", buffer[:, 10:50])
    assert torch.equal(buffer[:, 10:50], layer(x))
    assert buffer[:, :10].isnan().all() and buffer[:, 50:].isnan().all()


@needs_native
def test_kernel_argument_errors():
    layer = quant.from_weight(torch.randn(8, 64), "q4")
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="format=q5"):
        torch.ops.hmt.linear(x, layer.qweight, None, None, "q5")
    with pytest.raises(ValueError, match=r"K = 65 expects \(N, 60\)"):
        torch.ops.hmt.linear(torch.randn(2, 65), layer.qweight, None, None, "q4_1")
    with pytest.raises(TypeError, match="x has dtype"):
        torch.ops.hmt.linear(x.double(), layer.qweight, None, None, "q4_1")
    with pytest.raises(TypeError, match="format q8_0 expects"):
        torch.ops.hmt.linear(x, layer.qweight.view(torch.int8), None, None, "q8_0")
    with pytest.raises(ValueError, match="needs the per-row"):
        torch.ops.hmt.linear(x, torch.zeros(8, 64, dtype=torch.int8), None, None, "int8")
    with pytest.raises(ValueError, match="bias has shape"):
        torch.ops.hmt.linear(x, layer.qweight, None, torch.zeros(9), "q4_1")
    with pytest.raises(ValueError, match="expected one of avx512, avx2, scalar"):
        quant.set_isa("sse9")
    torch.library.opcheck(torch.ops.hmt.linear.default, (x, layer.qweight, None, None, "q4_1"))


# ---------------------------------------------------------------------------------------- the formats
def test_q4_1_layout_matches_gguf(fresh_seed):
    """Our Q4_1 / Q8_0 blocks, dequantized by gguf-py (llama.cpp's reference layout), equal our dequantization;
    round to nearest keeps every weight within half a step of its block."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    g = torch.Generator().manual_seed(fresh_seed)
    w = torch.randn(6, 128, generator=g) * torch.rand(6, 1, generator=g)
    q4 = quant.quantize_q4_1(w)
    ours = quant.dequantize_q4_1(q4, 128)
    theirs = torch.from_numpy(dequantize(q4.numpy(), GGMLQuantizationType.Q4_1).reshape(6, 128).copy()).float()
    assert torch.equal(ours, theirs)
    step = q4.reshape(6, 4, 20)[..., 0:2].contiguous().view(torch.float16).float()[..., 0]  # d per block
    assert ((ours - w).abs().reshape(6, 4, 32) <= step[..., None] * 0.5 + 1e-3 * step[..., None] + 1e-7).all()
    q8 = quant.quantize_q8_0(w)
    theirs8 = torch.from_numpy(dequantize(q8.numpy(), GGMLQuantizationType.Q8_0).reshape(6, 128).copy()).float()
    assert torch.equal(quant.dequantize_q8_0(q8, 128), theirs8)
    q, scale = quant.quantize_int8(w)
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] * 0.5 * (1 + 1e-5)).all()


def test_partial_block_padding_keeps_the_block_range():
    w = torch.tensor([[0.0, 1.0, 2.0] + [3.0] * 30 + [-1.0, 5.0]])  # K = 35: the second block has 3 elements
    out = quant.dequantize_q4_1(quant.quantize_q4_1(w), 35)
    assert out.shape == (1, 35)
    assert torch.allclose(out[0, 32:], torch.tensor([3.0, -1.0, 5.0]), atol=6 / 15 / 2 + 1e-3)


def test_quant_linear_keeps_its_storage_under_dtype_casts():
    layer = quant.from_weight(torch.randn(4, 32), "bf16", torch.randn(4))
    before = layer.dequantize()
    layer.to(torch.float64)
    layer.half()
    assert layer.qweight.dtype == torch.bfloat16 and layer.bias.dtype == torch.float32
    assert torch.equal(layer.dequantize(), before)
    with pytest.raises(ValueError, match="weight_format='q3'"):
        quant.QuantLinear(32, 4, "q3", layer.qweight)
    with pytest.raises(ValueError, match="expects torch.uint8"):
        quant.QuantLinear(32, 4, "q4", layer.qweight)


def test_quant_linear_falls_back_for_float64_and_autograd():
    weight = torch.randn(5, 64)
    layer = quant.from_weight(weight, "q4")
    x = torch.randn(2, 3, 64, dtype=torch.float64)
    assert torch.allclose(layer(x), x @ layer.dequantize().double().T, rtol=0, atol=1e-12)
    xg = torch.randn(3, 64, requires_grad=True)
    layer(xg).sum().backward()
    assert torch.allclose(xg.grad, layer.dequantize().sum(0).expand(3, 64), atol=1e-5)


# ----------------------------------------------------------------------------------------- whole models
def _tiny_llama(tied: bool, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).float().eval()


def _dequantized_reference(model: nn.Module, quantized: nn.Module) -> nn.Module:
    """A float32 copy of ``model`` whose converted weights are the quantized model's, dequantized (a tied head
    also gives the input embedding its dequantized table, as QuantEmbedding reads it)."""
    ref = copy.deepcopy(model)
    modules = dict(quantized.named_modules(remove_duplicate=False))
    with torch.no_grad():
        for name, module in ref.named_modules():
            q = modules.get(name)
            if isinstance(q, quant.QuantLinear):
                module.weight.copy_(q.dequantize())
    return ref


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8", "q4"])
@pytest.mark.parametrize("tied", [False, True])
def test_tiny_llama_end_to_end(fmt, tied, monkeypatch):
    monkeypatch.setenv("HMT_INT_DOT", "0")  # float32 products against the dequantized reference
    model = _tiny_llama(tied)
    quantized = copy.deepcopy(model)
    report = quant.quantize_model(quantized, fmt)
    linears = [m for m in quantized.modules() if isinstance(m, quant.QuantLinear)]
    assert len(linears) == 2 * 7 + 1 and not any(type(m) is nn.Linear for m in quantized.modules())
    head = quantized.get_output_embeddings()
    assert head.weight_format == ("q8" if fmt == "q4" else fmt) and len(report) == 15
    embed = quantized.get_input_embeddings()
    assert isinstance(embed, quant.QuantEmbedding) == tied
    ids = torch.randint(3, 97, (2, 19))
    ref = _dequantized_reference(model, quantized)
    if tied:  # the lookups read the quantized table
        assert torch.equal(ref.get_input_embeddings().weight, head.dequantize())
        assert torch.equal(embed(ids), head.dequantize()[ids])
    with torch.no_grad():
        got, want = quantized(ids).logits, ref(ids).logits
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (got - want).abs().max()
    if fmt == "bf16":  # 38 rows: the bfloat16 GEMM when it is on; activations rounded to bf16
        monkeypatch.setenv("HMT_BF16_GEMM", "1")
        with torch.no_grad():
            fast = quantized(ids).logits
        assert not torch.equal(fast, got)
        assert (fast - want).abs().max() < 0.05 * want.abs().max(), (fast - want).abs().max()
    if fmt == "fp32":
        assert torch.allclose(got, model(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", ["q4", "int8"])
def test_lora_stays_beside_the_quantized_base(tmp_path, fmt, monkeypatch):
    """A peft LoRA adapter loaded over QuantLinear layers: adapters unmerged, forward = the float peft model over
    the dequantized weights."""
    from peft import LoraConfig, PeftModel, get_peft_model

    monkeypatch.setenv("HMT_INT_DOT", "0")  # the float32-exact kernels (compared closely)

    model = _tiny_llama(tied=True)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a non-zero update
    peft_model.save_pretrained(tmp_path / "adapter")

    quantized = copy.deepcopy(model)
    quant.quantize_model(quantized, fmt)
    dequantized = _dequantized_reference(model, quantized)
    loaded = quant.load_adapter(quantized, tmp_path / "adapter")
    lora_layers = [m for m in loaded.modules() if type(m).__name__ == "LoraQuantLinear"]
    assert len(lora_layers) == 2 * 3
    assert all(isinstance(m.base_layer, quant.QuantLinear) and not m.merged for m in lora_layers)
    with pytest.raises(NotImplementedError, match="unmerged"):
        lora_layers[0].merge()

    reference = PeftModel.from_pretrained(dequantized, tmp_path / "adapter")
    ids = torch.randint(3, 97, (1, 23))
    with torch.no_grad():
        got = loaded(ids).logits
        want = reference(ids).logits
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (got - want).abs().max()
    with torch.no_grad(), loaded.disable_adapter():
        without = loaded(ids).logits
    assert (without - got).abs().max() > 1e-2  # the adapters do change the output

    # converting after peft wrapping replaces each LoRA layer's base layer and keeps its adapters
    wrapped = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "adapter")
    quant.quantize_model(wrapped, fmt)
    plain = [n for n, m in wrapped.named_modules() if type(m) is nn.Linear]
    assert plain and all(".lora_A." in n or ".lora_B." in n for n in plain), plain
    with torch.no_grad():
        assert torch.allclose(wrapped(ids).logits, want, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- the real default backbone
@pytest.mark.slow
def test_default_backbone_q4_is_the_gguf_blocks():
    """weights="q4" reads the GGUF's Q4_1 projections and Q8_0 tied embedding as stored: every dequantized weight
    equals today's fp32 weight exactly, the lookups are identical, and the logits differ only by float32
    accumulation order."""
    from hmt_runtime.model.loading import load_backbone

    fp, tokenizer = load_backbone("smollm2-135m")
    q4, _ = load_backbone("smollm2-135m", weights="q4")
    quant.set_int_dot(q4, False)  # the float32-exact kernels (the approximate path: benchmarks/quality_int_dot.py)
    kinds = sorted(set(q4.hmt_quantized.values()))
    assert kinds == ["q4 (gguf Q4_1)", "q8 (gguf Q8_0) (tied: also the input embedding)"], kinds
    fp_modules = dict(fp.named_modules())
    for name, module in q4.named_modules():
        if isinstance(module, quant.QuantLinear):
            ref = fp_modules[name.replace("model.embed_tokens.table", "lm_head")].weight
            assert torch.equal(module.dequantize(), ref), name
    assert quant.weight_bytes(q4) < 0.2 * quant.weight_bytes(fp)  # 97 MB against 538 MB

    ids = tokenizer("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
                    "must be in want of a wife.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(q4.get_input_embeddings()(ids), fp.get_input_embeddings()(ids))
        hidden = fp.model(ids).last_hidden_state
        want = fp(ids).logits.double()
        got = q4(ids).logits.double()
        # fp32 accumulation bound of the LM head alone, scaled by 30 layers of the same rounding upstream
        head = fp.lm_head.weight.double()
        bound = (576 + 2) * U * (hidden.double().abs() @ head.abs().T)
    err = (got - want).abs()
    assert err.max() < 1e-3 * want.abs().max(), err.max()
    assert (err <= 30 * bound + 1e-4).all(), (err / (bound + 1e-12)).max()
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.slow
def test_default_model_q4_applies_the_adapters_beside_the_blocks():
    from hmt_runtime import HMTModel

    fp = HMTModel.from_pretrained("default", kernels="torch", weights="fp32")
    q4 = HMTModel.from_pretrained("default", kernels="torch", weights="q4")
    quant.set_int_dot(q4, False)  # the float32-exact kernels, as above
    assert isinstance(q4.backbone, lean.LlamaForCausalLM)  # no transformers modeling, no peft
    lora = [m for m in q4.backbone.modules() if isinstance(m, lean.LoraLinear)]
    assert len(lora) == 30 * 7 and all(isinstance(m.base_layer, quant.QuantLinear) for m in lora)  # q k v o gate up down
    ids = q4.tokenizer("Elizabeth walked to Netherfield through the mud, and arrived with her stockings dirty. " * 3,
                       return_tensors="pt").input_ids
    with torch.no_grad():
        want, got = fp(ids).logits, q4(ids).logits
    assert (got - want).abs().max() < 1e-3 * want.abs().max(), (got - want).abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() == 1.0


@pytest.mark.slow
def test_default_model_greedy_tokens_equal_in_fp32_and_q4_on_real_text():
    """200 greedy tokens of the shipped default after 600 tokens of held-out text, fp32 and q4 weights (the
    GGUF's blocks, which dequantize exactly to the fp32 weights), each on the path users run (the scheduler
    with its default kernels and engine) with the float32-exact kernels: equal token for token.  (The integer
    dot products quantize activations, so they are compared by benchmarks/quality_int_dot.py instead.)"""
    from pathlib import Path

    from hmt_runtime import HMTModel
    from hmt_runtime.incremental.generation import generate_ids

    fp = HMTModel.from_pretrained("default", weights="fp32")
    q4 = HMTModel.from_pretrained("default", weights="q4")
    assert quant.set_int_dot(q4, False) > 0
    text = (Path(__file__).resolve().parents[1] / "data" / "austen" / "persuasion.txt").read_text(encoding="utf-8")
    ids = fp.tokenizer(text[20000:40000], add_special_tokens=False).input_ids[:600]
    prompt = torch.tensor([ids])
    want = generate_ids(fp, prompt, max_new_tokens=200, eos_token_id=[])[0, 600:].tolist()
    got = generate_ids(q4, prompt, max_new_tokens=200, eos_token_id=[])[0, 600:].tolist()
    first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    assert len(got) == len(want) == 200 and first is None, f"q4 leaves fp32's greedy tokens at new token {first}"


@pytest.mark.slow
def test_the_default_runs_its_gguf_blocks_with_integer_dots_unless_asked_otherwise(monkeypatch):
    """from_pretrained("default") and the CLI's loader take the q4 blocks (loading.default_weights) with the
    integer dot products (quant.int_dot_default; HMT_INT_DOT=0 turns them off); other backbones stay fp32."""
    from hmt_runtime import HMTModel
    from hmt_runtime.model.loading import default_weights

    model = HMTModel.from_pretrained("default")
    layers = [m for m in model.backbone.modules() if isinstance(m, quant.QuantLinear)]
    assert len(layers) == 30 * 7 + 1 and {m.weight_format for m in layers} == {"q4", "q8"}
    assert all(m.int_dot for m in layers) and layers[0].kernel_format.endswith(":i8")
    assert default_weights("smollm2-135m") == "q4" and default_weights("/some/other/model") == "fp32"
    monkeypatch.setenv("HMT_INT_DOT", "0")
    assert not quant.int_dot_default()
    exact = quant.from_weight(torch.randn(8, 64), "q4")
    assert exact.kernel_format == "q4_1" and quant.set_int_dot(exact, True) == 1 and exact.kernel_format == "q4_1:i8"
    with pytest.raises(TypeError, match="enabled=1"):
        quant.set_int_dot(exact, 1)
