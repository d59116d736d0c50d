"""Checkpoints: round trip, atomic replacement, clear errors for the wrong backbone or a file that is not one."""
import json
import os

import pytest
import torch

from hmt_runtime import HMTModel, load_backbone
from hmt_runtime.model.hmt import CONFIG_NAME, WEIGHTS_NAME
from test_model import make_model
from tiny import VOCAB, tiny_backbone


def save_tiny_backbone(path):
    bb = tiny_backbone("llama", seed=0)
    bb.save_pretrained(path)
    return bb


def test_round_trip_identical_outputs(tmp_path):
    model = make_model("llama", "paper")
    model.save_pretrained(tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / CONFIG_NAME).read_text())
    assert meta["hmt"]["recall"] == "paper" and meta["backbone"]["width"] == model.width
    loaded = HMTModel.from_pretrained(tmp_path / "ckpt", backbone=model.backbone)
    assert loaded.config == model.config
    ids = torch.randint(0, VOCAB, (1, 30))
    assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert torch.equal(model.generate(ids, max_new_tokens=8), loaded.generate(ids, max_new_tokens=8))


def test_round_trip_loads_backbone_from_recorded_path(tmp_path):
    save_tiny_backbone(tmp_path / "bb")
    from transformers import AutoModelForCausalLM

    backbone = AutoModelForCausalLM.from_pretrained(tmp_path / "bb", dtype=torch.float64)
    backbone.hmt_source = str(tmp_path / "bb")
    model = make_model("llama", "causal")
    model.backbone = backbone.eval()
    model.save_pretrained(tmp_path / "ckpt")
    loaded = HMTModel.from_pretrained(tmp_path / "ckpt", dtype=torch.float64)
    ids = torch.randint(0, VOCAB, (1, 20))
    assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-10)


def test_save_backbone_with_model(tmp_path):
    model = make_model("gpt2", "causal")
    model.save_pretrained(tmp_path / "full", save_backbone=True)
    loaded = HMTModel.from_pretrained(tmp_path / "full", dtype=torch.float64)
    ids = torch.randint(0, VOCAB, (1, 20))
    assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-10)


def test_failed_save_keeps_existing_checkpoint(tmp_path, monkeypatch):
    model = make_model("llama", "paper")
    target = tmp_path / "ckpt"
    model.save_pretrained(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    with torch.no_grad():
        model.memory_init.add_(1.0)

    import hmt_runtime.model.hmt as model_module

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(model_module, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary left behind


def test_recall_scale_is_recorded_and_old_configs_load_as_sqrt(tmp_path):
    model = make_model("llama", "paper", recall_scale="linear")
    model.save_pretrained(tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / CONFIG_NAME).read_text())
    assert meta["hmt"]["recall_scale"] == "linear"
    loaded = HMTModel.from_pretrained(tmp_path / "ckpt", backbone=model.backbone)
    assert loaded.config.recall_scale == "linear"
    ids = torch.randint(0, VOCAB, (1, 30))
    assert torch.equal(model(ids).logits, loaded(ids).logits)
    del meta["hmt"]["recall_scale"]  # a checkpoint written before the field existed
    (tmp_path / "ckpt" / CONFIG_NAME).write_text(json.dumps(meta))
    assert HMTModel.from_pretrained(tmp_path / "ckpt", backbone=model.backbone).config.recall_scale == "sqrt"
    meta["hmt"]["recall_scale"] = "cubic"
    (tmp_path / "ckpt" / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="recall_scale='cubic'"):
        HMTModel.from_pretrained(tmp_path / "ckpt", backbone=model.backbone)


def test_wrong_width_is_a_clear_error(tmp_path):
    make_model("opt").save_pretrained(tmp_path / "opt")  # width 24
    with pytest.raises(ValueError, match="width 24"):
        HMTModel.from_pretrained(tmp_path / "opt", backbone=tiny_backbone("llama"))  # width 32


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an HMT checkpoint"):
        HMTModel.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{ not json")
    with pytest.raises(ValueError, match="not an HMT checkpoint config"):
        HMTModel.from_pretrained(tmp_path, backbone=tiny_backbone())
    model = make_model()
    model.save_pretrained(tmp_path / "ok")
    (tmp_path / "ok" / WEIGHTS_NAME).write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        HMTModel.from_pretrained(tmp_path / "ok", backbone=model.backbone)


def test_load_backbone_rejects_unknown_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        load_backbone(str(tmp_path / "missing"))


def test_lora_adapter_round_trip(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = make_model("llama", "causal")
    peft_bb = get_peft_model(model.backbone, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    with torch.no_grad():
        for name, p in peft_bb.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.backbone = peft_bb
    model.save_pretrained(tmp_path / "lora")
    assert os.path.isdir(tmp_path / "lora" / "adapter")
    loaded = HMTModel.from_pretrained(tmp_path / "lora", backbone=tiny_backbone("llama", seed=0))
    ids = torch.randint(0, VOCAB, (1, 20))
    assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-10)


def test_saved_files_follow_the_umask_and_adapter_records_portable_base(tmp_path):
    from peft import LoraConfig, get_peft_model

    old = os.umask(0o022)
    try:
        model = make_model("llama", "causal")
        model.backbone = get_peft_model(model.backbone, LoraConfig(r=2, target_modules=["q_proj"]))
        model.backbone.hmt_source = "some-backbone"
        model.save_pretrained(tmp_path / "ckpt")
    finally:
        os.umask(old)
    assert (tmp_path / "ckpt").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "ckpt" / WEIGHTS_NAME).stat().st_mode & 0o777 == 0o644
    adapter = json.loads((tmp_path / "ckpt" / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "some-backbone"


def test_checkpoint_records_checksums_and_its_own_files(tmp_path):
    from safetensors import safe_open

    from hmt_runtime.core.atomic import MARKER
    from hmt_runtime.core.checks import tensor_digest

    model = make_model("llama", "causal")
    model.save_pretrained(tmp_path / "ckpt")
    with safe_open(tmp_path / "ckpt" / WEIGHTS_NAME, framework="pt") as f:
        sums = json.loads(f.metadata()["sha256"])
        assert set(sums) == set(model.hmt_state_dict())
        assert all(sums[name] == tensor_digest(f.get_tensor(name)) for name in sums)
    marker = json.loads((tmp_path / "ckpt" / MARKER).read_text())
    assert marker["complete"] and marker["files"] == sorted([CONFIG_NAME, WEIGHTS_NAME])
    # saving again replaces it (its own files), and leaves nothing beside it
    model.save_pretrained(tmp_path / "ckpt", save_backbone=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert (tmp_path / "ckpt" / "backbone" / "config.json").is_file()
    model.save_pretrained(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt" / "backbone").exists()
