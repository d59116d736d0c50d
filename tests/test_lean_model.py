"""The lean Llama model (hmt_runtime.model.lean): the default backbone in q4 without transformers' modeling code
or peft, equal to transformers' model over the same blocks, its adapter read and written in peft's files."""
import json
import subprocess
import sys

import pytest
import torch

from hmt_runtime.model import lean
from hmt_runtime.native import quant

pytestmark = pytest.mark.slow

TEXT = ("Elizabeth walked to Netherfield through the mud, and arrived with her stockings dirty; "
        "Mr. Bingley's sisters could hardly keep their countenance. ") * 2


def _both():
    from hmt_runtime.model import loading

    folder = loading.default_backbone_folder()
    fast = loading._default_q4(folder, {"dtype": torch.float32}, lean=True)
    reference = loading._default_q4(folder, {"dtype": torch.float32}, lean=False)
    return fast, reference


def test_lean_q4_equals_transformers_q4_over_the_same_blocks():
    from hmt_runtime.model.loading import load_backbone

    fast, reference = _both()
    assert isinstance(fast, lean.LlamaForCausalLM) and not isinstance(reference, lean.LlamaForCausalLM)
    assert fast.hmt_quantized == reference.hmt_quantized
    quant.set_int_dot(fast, False)
    quant.set_int_dot(reference, False)
    _, tokenizer = load_backbone("smollm2-135m", weights="q4")
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        got, want = fast(ids).logits.double(), reference(ids).logits.double()
        positions = torch.arange(5, 5 + ids.shape[1])[None]
        shifted = fast.model(inputs_embeds=fast.get_input_embeddings()(ids), position_ids=positions).last_hidden_state
        shifted_want = reference.model(inputs_embeds=reference.get_input_embeddings()(ids), position_ids=positions,
                                       use_cache=False).last_hidden_state
    assert (got - want).abs().max() <= 1e-4 * want.abs().max(), (got - want).abs().max()
    with torch.no_grad():
        loss, want_loss = fast(ids, labels=ids).loss, reference(ids, labels=ids).loss
    assert abs(float(loss) - float(want_loss)) < 1e-4 * float(want_loss)
    with pytest.raises(ValueError, match="attention_mask"):
        fast(ids, attention_mask=torch.zeros_like(ids))
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert torch.allclose(shifted, shifted_want, rtol=1e-4, atol=1e-4 * float(shifted_want.abs().max()))


def test_loading_the_default_imports_neither_transformers_modeling_nor_peft():
    code = ("import sys\nfrom hmt_runtime import HMTModel, generate\nm = HMTModel.from_pretrained('default')\n"
            "generate(m, 'It was a bright cold day in April, and', max_new_tokens=4)\n"
            "print(sorted(k for k in ('transformers.modeling_utils', 'peft', 'torch._dynamo') if k in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_lean_adapter_round_trips_through_peft_files(tmp_path):
    """from_pretrained("default") (lean, adapter without peft) saved and loaded again gives the same logits, and
    the adapter it wrote loads with peft over transformers' fp32 model too."""
    from hmt_runtime import HMTModel

    model = HMTModel.from_pretrained("default", kernels="torch")
    assert isinstance(model.backbone, lean.LlamaForCausalLM) and model.backbone.lora_config is not None
    ids = model.tokenizer(TEXT, return_tensors="pt").input_ids
    model.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["peft_type"] == "LORA"
    again = HMTModel.from_pretrained(tmp_path / "saved", kernels="torch")
    fp = HMTModel.from_pretrained(tmp_path / "saved", kernels="torch", weights="fp32")
    assert hasattr(fp.backbone, "peft_config")
    for m in (model, again):  # the float32-exact kernels (the approximate path: benchmarks/quality_int_dot.py)
        quant.set_int_dot(m, False)
    with torch.no_grad():
        want = model(ids).logits
        assert torch.equal(again(ids).logits, want)
        ref = fp(ids).logits
    assert (want - ref).abs().max() < 1e-3 * ref.abs().max()
    with model.backbone.disable_adapter(), torch.no_grad():
        off = model(ids).logits
    assert (off - want).abs().max() > 1e-3 * want.abs().max()  # the adapter does something, and can be turned off
    with pytest.raises(ValueError, match="save_backbone=True"):
        model.save_pretrained(tmp_path / "with_backbone", save_backbone=True)
    assert not (tmp_path / "with_backbone").exists()


def test_attach_adapter_refuses_a_damaged_adapter(tmp_path):
    from hmt_runtime.model.loading import DEFAULT_BACKBONE, load_backbone
    from safetensors.torch import load_file, save_file
    from hmt_runtime.model.hmt import DEFAULT_DIR

    source = DEFAULT_DIR / "adapter"
    tensors = load_file(source / "adapter_model.safetensors")
    config = json.loads((source / "adapter_config.json").read_text())

    def attempt(tensors, config):
        (tmp_path / "adapter_config.json").write_text(json.dumps(config))
        save_file(tensors, tmp_path / "adapter_model.safetensors")
        backbone, _ = load_backbone(DEFAULT_BACKBONE, weights="q4")
        return lean.attach_adapter(backbone, tmp_path)

    key = next(iter(tensors))
    with pytest.raises(ValueError, match="NaN or infinite"):
        attempt({**tensors, key: torch.full_like(tensors[key], float("nan"))}, config)
    with pytest.raises(ValueError, match="expected"):
        attempt({**tensors, key: tensors[key][:, :-1].contiguous()}, config)
    with pytest.raises(ValueError, match="no tensor"):
        attempt({k: v for k, v in tensors.items() if k != key}, config)
    with pytest.raises(ValueError, match="use_dora"):
        attempt(tensors, {**config, "use_dora": True})
    assert isinstance(attempt(tensors, config), lean.LlamaForCausalLM)


def test_the_lean_adapter_is_frozen_so_no_gradient_goes_missing_silently():
    from hmt_runtime import HMTModel

    model = HMTModel.from_pretrained("default", kernels="torch")
    lora = [p for n, p in model.backbone.named_parameters() if "lora_" in n]
    assert len(lora) == 2 * 30 * 7 and not any(p.requires_grad for p in lora)
