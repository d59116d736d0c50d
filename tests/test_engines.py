"""The engines (hmt_runtime/engines.py): the lean forward's projections in every form (nn.Linear, LoRA merged,
QuantLinear with LoRA beside) and the native one-op decode step, against the python path and the forward."""
import os

import pytest
import torch

from helpers import SEGMENT, VOCAB, make_model, mixed_prompts
from hmt_runtime import generate
from hmt_runtime.incremental.engines import LlamaEngine, Projection
from hmt_runtime.incremental.scheduler import Scheduler


def _native() -> bool:
    from hmt_runtime.native import kernels as native

    return native.available() and hasattr(torch.ops.hmt, "decode_step")


needs_native = pytest.mark.skipif(not _native(), reason="the native extension hmt_runtime._C is not built")


def float_model(recall="causal", seed=0, kernels="torch", family="llama"):
    model = make_model(family, recall, seed=seed).float()
    model.config.kernels = kernels
    return model


def with_lora(model, seed=1, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")):
    from peft import LoraConfig, get_peft_model

    model.backbone = get_peft_model(model.backbone, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets)))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.backbone.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return model.eval()


def test_projection_forms_compute_the_module_output():
    from peft import LoraConfig, get_peft_model
    from hmt_runtime.native import quant

    torch.manual_seed(0)
    linear = torch.nn.Linear(40, 24, bias=True).double()
    x = torch.randn(3, 5, 40, dtype=torch.float64)
    assert torch.equal(Projection(linear)(x), linear(x))
    wrapped = get_peft_model(torch.nn.Sequential(linear), LoraConfig(r=3, target_modules=["0"]))
    with torch.no_grad():
        wrapped.base_model.model[0].lora_B["default"].weight.normal_()
    layer = wrapped.base_model.model[0]
    assert torch.allclose(Projection(layer)(x), layer(x), rtol=0, atol=1e-12)  # merged in float64
    assert not layer.merged
    with pytest.raises(ValueError, match="not an nn.Linear or a QuantLinear"):
        Projection(torch.nn.Conv1d(2, 2, 1))
    if _native():
        q = quant.quantize_linear(torch.nn.Linear(64, 24).float(), "int8")
        xf = torch.randn(4, 64)
        assert torch.allclose(Projection(q)(xf), xf @ q.dequantize().T + q.bias, rtol=1e-5, atol=1e-5)


@needs_native
@pytest.mark.parametrize("lora", [False, True])
def test_native_decode_step_equals_the_python_step(lora):
    """Rows at different positions of their segments (batch 3), against the same engine without the fused op."""
    model = float_model(kernels="native", seed=3)
    if lora:
        model = with_lora(model)
    fused = LlamaEngine(model.backbone, 3, model.config.window, fused_decode=True)
    plain = LlamaEngine(model.backbone, 3, model.config.window)
    embeds = torch.randn(3, 9, model.width) * 0.5
    with torch.no_grad():
        for engine in (fused, plain):
            for row, n in enumerate((2, 7, 5)):
                engine.prefill(row, embeds[row : row + 1, :n], 0)
        step = torch.randn(3, 1, model.width) * 0.5
        live = torch.tensor([1, 1, 0])
        a = fused.decode(step, live, span=None)
        b = plain.decode(step, live, span=None)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), float((a - b).abs().max())
    assert fused.kv.lens.tolist() == plain.kv.lens.tolist() == [3, 8, 5]
    for layer in range(fused.n_layers):  # the op appended the same keys and values
        assert torch.allclose(fused.kv.keys[layer], plain.kv.keys[layer], rtol=1e-4, atol=1e-5)
        assert torch.allclose(fused.kv.values[layer], plain.kv.values[layer], rtol=1e-4, atol=1e-5)


def wide_lora_backbone(fmt: str):
    """A float32 Llama wide enough that its products split over two threads, a LoRA adapter on every projection
    (B large enough to matter), its linears converted to QuantLinear ``fmt`` (the adapter stays beside them)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    from hmt_runtime.native import quant

    torch.manual_seed(7)
    # widths that are not whole tiles of 16 outputs (k / v 132, gate / up 1000): the last tile is partial
    cfg = LlamaConfig(vocab_size=64, hidden_size=264, intermediate_size=1000, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    backbone = get_peft_model(LlamaForCausalLM(cfg).float().eval(), LoraConfig(r=4, lora_alpha=8,
                                                                               target_modules=targets))
    with torch.no_grad():
        for name, p in backbone.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    quant.quantize_model(backbone, fmt)
    return backbone


@needs_native
def test_adapter_beside_the_weights_in_the_decode_step_equals_the_python_step():
    """fp32 QuantLinear weights with float32 LoRA factors beside them: the decode step (A x on the calling thread,
    B s added by each thread to the rows it computed) equals the python projections to float32 rounding, in every
    instruction-set build, with the products split over two threads."""
    from hmt_runtime.native import quant

    backbone = wide_lora_backbone("fp32")
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fused = LlamaEngine(backbone, 2, 64, fused_decode=True)
        plain = LlamaEngine(backbone, 2, 64)
        assert fused.layers[0].down.lora_a is not None and fused.step_args["lora_a"][6] is not None
        embeds, step = torch.randn(2, 6, 264), torch.randn(2, 1, 264)
        with torch.no_grad():
            for engine in (fused, plain):
                for row, n in enumerate((3, 6)):
                    engine.prefill(row, embeds[row : row + 1, :n], 0)
            b = plain.decode(step, torch.tensor([0, 0]))
            for isa in quant.isas():
                with quant.use_isa(isa):
                    a = fused.decode(step, torch.tensor([0, 0]))
                assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), (isa, float((a - b).abs().max()))
    finally:
        torch.set_num_threads(previous)


@needs_native
def test_adapter_beside_integer_dots_goes_to_the_decode_step_compact():
    """Beside q4 blocks with integer dots the decode step gets A as Q8_0 blocks (integer dots on the x the base
    projection quantized) and B^T in bfloat16, B added by each thread to the rows it computed; it then equals the
    step given those factors dequantized to float32 up to x's int8 quantization in A's product, in every
    instruction-set build, with products wide enough to split over two threads; without integer dots the
    factors stay float32."""
    from hmt_runtime.native import quant

    backbone = wide_lora_backbone("q4")
    quant.set_int_dot(backbone, True)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        compact = LlamaEngine(backbone, 2, 64, fused_decode=True)
        args = compact.layers[0].q.kernel_args()
        assert args[3] == "q4_1:i8" and args[4].dtype == torch.uint8 and args[5].dtype == torch.bfloat16
        # the same factors widened to float32: A dequantized (so x is not quantized in A's product), or B only
        widened, wide_b = (LlamaEngine(backbone, 2, 64, fused_decode=True) for _ in range(2))
        for w_layer, b_layer in zip(widened.layers, wide_b.layers):
            for name in ("q", "k", "v", "o", "gate", "up", "down"):
                a_q8, tiles = getattr(w_layer, name).kernel_args()[4:6]
                a_wide = quant.dequantize_q8_0(a_q8, getattr(w_layer, name).lora_a.shape[1])
                getattr(w_layer, name)._decode_lora = (True, a_wide, tiles.float())
                getattr(b_layer, name).kernel_args()
                getattr(b_layer, name)._decode_lora = (True, a_q8, tiles.float())
        for engine in (widened, wide_b):
            engine.step_args = engine._step_args()
        assert widened.step_args["lora_a"][0].dtype == torch.float32
        assert wide_b.step_args["lora_a"][0].dtype == torch.uint8
        assert wide_b.step_args["lora_b"][0].dtype == torch.float32
        embeds = torch.randn(2, 6, 264)
        step = torch.randn(2, 1, 264)
        with torch.no_grad():
            for engine in (compact, widened, wide_b):
                for row, n in enumerate((3, 6)):
                    engine.prefill(row, embeds[row : row + 1, :n], 0)
            for isa in quant.isas():  # every instruction-set build of the products and of the B^T epilogue
                with quant.use_isa(isa):
                    a = compact.decode(step, torch.tensor([0, 0]))
                    b = widened.decode(step, torch.tensor([0, 0]))
                    c = wide_b.decode(step, torch.tensor([0, 0]))
                assert torch.allclose(a, c, rtol=1e-5, atol=1e-5), (isa, float((a - c).abs().max()))  # bf16 tiles
                err = float((a - b).abs().max())
                assert 0 < err < 5e-2 * float(b.abs().max()), (isa, err)  # A's Q8_0 blocks on the int8 x
    finally:
        torch.set_num_threads(previous)

    quant.set_int_dot(backbone, False)
    exact = LlamaEngine(backbone, 2, 64, fused_decode=True)
    args = exact.layers[0].q.kernel_args()
    assert args[3] == "q4_1" and args[4].dtype == torch.float32 and args[5].dtype == torch.float32


@needs_native
def test_fused_engine_lm_head_on_the_native_kernel():
    """With the fused decode step, a float32 nn.Linear LM head runs on the native fp32 kernel for fewer than 32
    rows: logits within the float32 summation bound of a float64 reference; 32 rows and more (and engines
    without the fused step) use the model's own head."""
    model = float_model(kernels="native", seed=5)
    fused = LlamaEngine(model.backbone, 1, model.config.window, fused_decode=True)
    plain = LlamaEngine(model.backbone, 1, model.config.window)
    head = model.backbone.get_output_embeddings()
    assert fused.head is not None and fused.head[0] is head.weight and plain.head is None
    seed = int.from_bytes(os.urandom(4), "little")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for rows in (1, 5, 31, 32):
            hidden = torch.randn(rows, model.width, generator=g)
            got = fused.logits(model, hidden).double()
            want = hidden.double() @ head.weight.double().T
            bound = (model.width + 2) * 2.0 ** -24 * (hidden.double().abs() @ head.weight.double().abs().T)
            assert ((got - want).abs() <= bound + 1e-30).all(), (rows, seed)
            if rows >= 32:
                assert torch.equal(fused.logits(model, hidden), model.lm_logits(hidden))
            assert torch.equal(plain.logits(model, hidden), model.lm_logits(hidden))


@needs_native
@pytest.mark.parametrize("recall", ["causal", "paper"])
def test_native_backend_runs_decode_as_one_op_with_the_torch_tokens(recall):
    native, reference = float_model(recall, seed=4, kernels="native"), float_model(recall, seed=4)
    sched = Scheduler(native)
    assert sched.backend.fused_decode and sched.engine.step_args is not None
    assert not Scheduler(reference).backend.fused_decode
    prompts = mixed_prompts(9)
    assert generate(native, prompts, max_new_tokens=2 * SEGMENT) == generate(reference, prompts, max_new_tokens=2 * SEGMENT)


@needs_native
@pytest.mark.parametrize("fmt", ["bf16", "int8", "q4"])
def test_quantized_backbone_with_lora_on_the_lean_engine(fmt):
    """QuantLinear projections (LoRA beside them) run on the lean engine, fused and unfused alike, and give the
    teacher-forced forward's greedy tokens of the same quantized model."""
    from hmt_runtime.native import quant
    from helpers import forward_greedy

    model = with_lora(float_model(seed=5, kernels="native"), targets=("q_proj", "v_proj"))
    quant.quantize_model(model.backbone, fmt)  # the LoRA layers' base layers become QuantLinear
    sched = Scheduler(model)
    assert sched.engine.name == "lean" and sched.backend.fused_decode
    assert sched.engine.layers[0].q.lora_a is not None  # beside the quantized weight, not merged
    prompt = mixed_prompts(10)[3]
    out = generate(model, [prompt], max_new_tokens=SEGMENT)[0]
    model.config.kernels = "torch"  # the python path over the same QuantLinear modules
    assert generate(model, [prompt], max_new_tokens=SEGMENT)[0] == out
    assert out == forward_greedy(model, prompt, SEGMENT)


@needs_native
def test_bfloat16_kv_cache_written_and_read_by_the_native_attention():
    """A bfloat16 KV cache (``kv_dtype``): prefill (the fused attention) and the one-op decode step append to it in
    bfloat16 and read it widened; hidden states stay within bfloat16 rounding of the float32 cache's, and are not
    equal to them (the cache really is stored in bfloat16).  Only the fused attention can hold another type than
    the backbone's."""
    from hmt_runtime.native import kernels as native

    model = float_model(kernels="native", seed=6)
    ops = native.ops()
    half = LlamaEngine(model.backbone, 3, model.config.window, ops, fused_decode=True, kv_dtype=torch.bfloat16)
    full = LlamaEngine(model.backbone, 3, model.config.window, ops, fused_decode=True)
    assert half.kv.keys[0].dtype == half.kv.values[-1].dtype == torch.bfloat16
    assert full.kv.keys[0].dtype == torch.float32
    seed = int.from_bytes(os.urandom(4), "little")
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(3, 9, model.width, generator=g) * 0.5
    steps = torch.randn(4, 3, 1, model.width, generator=g) * 0.5
    outs = []
    with torch.no_grad():
        for engine in (half, full):
            hidden = [engine.prefill(row, embeds[row : row + 1, :n], 0) for row, n in enumerate((3, 9, 6))]
            for step in steps:
                hidden.append(engine.decode(step, torch.tensor([1, 1, 0])))
            outs.append(hidden)
    for a, b in zip(*outs):
        err = float((a - b).abs().max())
        assert 0 < err < 1e-2 * float(b.abs().max()), (err, seed)
    with pytest.raises(ValueError, match="kv_dtype"):
        LlamaEngine(model.backbone, 1, model.config.window, None, kv_dtype=torch.bfloat16)


@needs_native
def test_kv_cache_type_follows_the_path(monkeypatch):
    """HMT_KV_CACHE=auto: bfloat16 beside integer dots (q4 weights), the model's dtype for float32 weights (exact
    against the forward); "bf16" forces it under the fused step, "fp32" turns it off, anything else is refused."""
    from hmt_runtime.native import quant

    exact = float_model(kernels="native", seed=7)
    assert Scheduler(exact).kv.keys[0].dtype == torch.float32
    approximate = float_model(kernels="native", seed=7)
    quant.quantize_model(approximate.backbone, "q4")
    sched = Scheduler(approximate)
    assert sched.backend.kv_dtype == torch.bfloat16 and sched.kv.keys[0].dtype == torch.bfloat16
    monkeypatch.setenv("HMT_KV_CACHE", "fp32")
    assert Scheduler(approximate).kv.keys[0].dtype == torch.float32
    monkeypatch.setenv("HMT_KV_CACHE", "bf16")
    assert Scheduler(exact).kv.keys[0].dtype == torch.bfloat16
    assert Scheduler(float_model(seed=7)).kv.keys[0].dtype == torch.float32  # torch ops: no fused step
    monkeypatch.setenv("HMT_KV_CACHE", "half")
    with pytest.raises(ValueError, match="HMT_KV_CACHE='half'"):
        Scheduler(exact)
