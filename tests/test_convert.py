"""Checkpoints of HMT-pytorch (the paper's code): synthetic ones in its exact key layout, converted, against an
independent float64 implementation of its segment loop; generation after conversion; clear errors."""
import copy
import json
import math

import pytest
import torch

from hmt_runtime import HMTModel
from hmt_runtime.model import hmt_pytorch as convert_module
from hmt_runtime.cli import main
from hmt_runtime.model.convert import from_hmt_pytorch
from helpers import greedy_positions_matching
from tiny import VOCAB, tiny_backbone

WINDOW, SENSORY, RECALL_DIM, SLOTS = 14, 3, 16, 3  # Ls = 9, j = round(9 * 0.5) = 4 (Python rounds half to even)
SEGMENT, SUMMARY = 9, 4
LORA_TARGETS = {
    "llama": ["embed_tokens", "gate_proj", "up_proj", "down_proj", "q_proj", "k_proj", "v_proj", "o_proj"],
    "opt": ["embed_tokens", "fc1", "fc2", "q_proj", "k_proj", "v_proj", "out_proj"],
}


def reference_checkpoint(family="llama", lora=False, seed=0):
    """(state dict as HMT-pytorch saves it after accelerate's prepare, float64 reference parts).

    The backbone is float32 (as the reference loads it), W_q / W_k bfloat16 (its CrossAttentionMemory), the
    unused mem_map present; with LoRA, peft's layout (r 8, alpha 32) with random adapter weights."""
    backbone = tiny_backbone(family, seed=seed, dtype=torch.float32)
    if lora:
        from peft import LoraConfig, TaskType, get_peft_model

        backbone = get_peft_model(backbone, LoraConfig(task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=32,
                                                       lora_dropout=0.0, target_modules=LORA_TARGETS[family]))
        with torch.no_grad():
            for name, param in backbone.named_parameters():
                if "lora_" in name:
                    param.normal_(0, 0.05)
    backbone.eval()
    width = backbone.get_input_embeddings().weight.shape[1]
    std = float(backbone.get_input_embeddings().weight.detach().std())
    g = torch.Generator().manual_seed(seed + 10)
    hmt = {
        "mem": torch.randn(1, width, generator=g) * std,
        "memory_cell.memory": torch.randn(1, width, generator=g) * std,
        "cross_attn.wq.weight": torch.randn(RECALL_DIM, width, generator=g).to(torch.bfloat16),
        "cross_attn.wk.weight": torch.randn(RECALL_DIM, width, generator=g).to(torch.bfloat16),
        "memory_cell.mem_map.linear.weight": torch.randn(width, width, generator=g),
        "memory_cell.mem_map.inv_linear.weight": torch.randn(width, width, generator=g),
    }
    state = {"module." + k: v for k, v in hmt.items()}
    state.update({"module.memory_cell.model." + k: v.clone() for k, v in backbone.state_dict().items()})
    parts = {"backbone": copy.deepcopy(backbone).double().eval(),
             **{k: v.double() for k, v in hmt.items() if "mem_map" not in k}}
    return state, parts


@torch.no_grad()
def reference_logits(parts, ids, segment_size=SEGMENT, num_sensory=SENSORY, sum_fraction=0.5, ltm_context=SLOTS,
                     linear=False):
    """HMT-pytorch's RecurrentWrapper.forward, written out in float64: per segment of ``segment_size`` tokens a
    summary pass [T ; E(first j ids) ; T] (j = round(segment_size * fraction)), recall over the newest
    ``ltm_context`` memories (scores / sqrt(d_h), or / d_h with ``linear``; M_init before any memory), then
    [P ; E(previous segment's last k ids) ; E(segment) ; P]; logits of the segment's ids; the new memory is the
    last hidden state."""
    bb, embed = parts["backbone"], parts["backbone"].get_input_embeddings()
    t, m_init = parts["mem"], parts["memory_cell.memory"]
    wq, wk = parts["cross_attn.wq.weight"], parts["cross_attn.wk.weight"]
    batch = ids.shape[0]
    j = int(round(segment_size * sum_fraction))

    def run(embeds):
        out = bb(inputs_embeds=embeds, output_hidden_states=True)  # positions 0.. in every pass
        return out.logits, out.hidden_states[-1]

    memory_seq, prepend, logits = None, None, []
    for start in range(0, ids.shape[1], segment_size):
        x = ids[:, start : start + segment_size]
        prompt = t.expand(batch, 1, -1)
        _, hidden = run(torch.cat([prompt, embed(x[:, :j]), prompt], 1))
        q_mem = hidden[:, -1:]
        if memory_seq is None:
            p = m_init.expand(batch, 1, -1)
        else:
            scores = (q_mem @ wq.T) @ (memory_seq @ wk.T).transpose(1, 2)
            scores = scores / (wq.shape[0] if linear else math.sqrt(wq.shape[0]))
            p = torch.softmax(scores, -1) @ memory_seq
        inputs = [p] + ([embed(prepend)] if prepend is not None else []) + [embed(x), p]
        out, hidden = run(torch.cat(inputs, 1))
        n_prepend = 0 if prepend is None else num_sensory
        logits.append(out[:, 1 + n_prepend : -1])
        memory = hidden[:, -1:]
        memory_seq = memory if memory_seq is None else torch.cat([memory_seq, memory], 1)[:, -ltm_context:]
        prepend = x[:, -num_sensory:] if num_sensory else None
    return torch.cat(logits, 1)


def rel_err(a, b):
    return float((a.detach().double() - b).abs().max() / b.abs().max())


def save_backbone_folder(path, family="llama"):
    """A transformers folder of the backbone (config.json; its weights are not what the converter uses)."""
    tiny_backbone(family, seed=99, dtype=torch.float32).save_pretrained(path)
    return path


def convert(tmp_path, state, family="llama", **kwargs):
    torch.save(state, tmp_path / "model_weights_100.pth")
    folder = save_backbone_folder(tmp_path / "backbone", family)
    sizes = dict(window=WINDOW, sensory_tokens=SENSORY, recall_dim=RECALL_DIM, memory_slots=SLOTS, kernels="torch")
    return from_hmt_pytorch(tmp_path / "model_weights_100.pth", str(folder), **{**sizes, **kwargs})


def cli_args(checkpoint, backbone, out, *extra):
    return ["convert", "--from", "hmt-pytorch", str(checkpoint), "--backbone", str(backbone), "--window", str(WINDOW),
            "--sensory-tokens", str(SENSORY), "--recall-dim", str(RECALL_DIM), "--memory-slots", str(SLOTS),
            "--out", str(out), *extra]


# ------------------------------------------------------------------------------------------ equal to the reference
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_converted_logits_equal_the_reference_loop(tmp_path, family, lora):
    state, parts = reference_checkpoint(family, lora, seed=1)
    model = convert(tmp_path, state, family, dtype=torch.float64)
    assert model.config.recall == "paper" and model.config.summary_tokens == SUMMARY
    assert model.config.segment_tokens == SEGMENT and model.config.recall_scale == "sqrt"
    assert model.width == (24 if family == "opt" else 32)  # OPT: word_embed_proj_dim
    assert torch.equal(model.recall.w_q.weight, state["module.cross_attn.wq.weight"].double())
    assert not hasattr(model.backbone, "peft_config")  # LoRA merged
    ids = torch.randint(0, VOCAB, (2, 5 * SEGMENT + 2), generator=torch.Generator().manual_seed(3))
    expected = reference_logits(parts, ids)  # 6 segments, N = 3: eviction; a last segment shorter than j
    assert rel_err(model(ids).logits, expected) < 1e-9
    if family == "opt" and lora:  # the embedding LoRA is merged; the LM head keeps the base (tied) weight
        assert model.hmt_conversion["untied_lm_head"]
        head = model.backbone.get_output_embeddings().weight
        assert torch.equal(head, state["module.memory_cell.model.base_model.model.lm_head.weight"].double())


def test_linear_recall_scale_reproduces_the_reference_quirk(tmp_path):
    state, parts = reference_checkpoint("llama", seed=2)
    model = convert(tmp_path, state, dtype=torch.float64, recall_scale="linear")
    ids = torch.randint(0, VOCAB, (1, 5 * SEGMENT), generator=torch.Generator().manual_seed(4))
    assert rel_err(model(ids).logits, reference_logits(parts, ids, linear=True)) < 1e-9
    assert rel_err(model(ids).logits, reference_logits(parts, ids)) > 1e-6  # the scale matters here


def test_quirk_sizes_require_an_explicit_recall_scale(tmp_path, monkeypatch):
    monkeypatch.setattr(convert_module, "QUIRK_WIDTH", 16)  # d = 32 and d_h = 16 stand for 4096 and 4096
    state, _ = reference_checkpoint("llama")
    with pytest.raises(ValueError, match="--recall-scale"):
        convert(tmp_path, state)
    assert convert(tmp_path, state, recall_scale="sqrt").config.recall_scale == "sqrt"


def test_default_dtype_is_the_checkpoints_and_can_be_chosen(tmp_path):
    state, parts = reference_checkpoint("llama", lora=True)
    model = convert(tmp_path, state)
    assert model.dtype == torch.float32 and model.recall.w_q.weight.dtype == torch.float32
    ids = torch.randint(0, VOCAB, (1, 3 * SEGMENT), generator=torch.Generator().manual_seed(5))
    assert rel_err(model(ids).logits, reference_logits(parts, ids)) < 1e-5
    assert convert(tmp_path, state, dtype="bfloat16").dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------ the command and reload
@pytest.mark.parametrize("family, lora", [("llama", False), ("opt", True)])
def test_cli_writes_a_checkpoint_that_loads_and_generates_like_the_forward(tmp_path, capsys, family, lora):
    state, parts = reference_checkpoint(family, lora, seed=4)
    torch.save(state, tmp_path / "model_weights_7.pth")
    folder = save_backbone_folder(tmp_path / "backbone", family)
    assert main(cli_args(tmp_path / "model_weights_7.pth", folder, tmp_path / "converted")) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and ("LoRA merged" in printed) == lora
    meta = json.loads((tmp_path / "converted" / "hmt_config.json").read_text())
    assert meta["hmt"]["recall"] == "paper" and meta["hmt"]["recall_scale"] == "sqrt" and meta["backbone_dir"]
    model = HMTModel.from_pretrained(tmp_path / "converted", dtype=torch.float64)
    ids = torch.randint(0, VOCAB, (1, 4 * SEGMENT + 5), generator=torch.Generator().manual_seed(6))
    # stored float32: exact for copied weights, one float32 rounding for merged LoRA weights
    assert rel_err(model(ids).logits, reference_logits(parts, ids)) < (1e-5 if lora else 1e-9)
    prompt = ids[:, : SEGMENT + 2]
    out = model.generate(prompt, max_new_tokens=3 * SEGMENT)
    checked = 0
    for i, ok in greedy_positions_matching(model, prompt.shape[1], out):
        if (i - 1) % SEGMENT >= SUMMARY - 1:  # paper mode: from position j - 1 on, as for native checkpoints
            assert ok, f"token {i} differs from the forward pass"
            checked += 1
    assert checked >= 15


def test_consolidated_zero_outputs_convert(tmp_path):
    """zero_to_fp32.py writes the module's keys without "module.": a pytorch_model.bin, or sharded safetensors."""
    from safetensors.torch import save_file

    state, parts = reference_checkpoint("llama", seed=5)
    bare = {k[len("module."):]: v for k, v in state.items()}
    (tmp_path / "single").mkdir()
    torch.save(bare, tmp_path / "single" / "pytorch_model.bin")
    folder = save_backbone_folder(tmp_path / "backbone")
    sizes = dict(window=WINDOW, sensory_tokens=SENSORY, recall_dim=RECALL_DIM, memory_slots=SLOTS,
                 dtype=torch.float64, kernels="torch")
    ids = torch.randint(0, VOCAB, (1, 3 * SEGMENT), generator=torch.Generator().manual_seed(7))
    expected = reference_logits(parts, ids)
    assert rel_err(from_hmt_pytorch(tmp_path / "single", folder, **sizes)(ids).logits, expected) < 1e-9
    (tmp_path / "sharded").mkdir()
    keys = sorted(bare)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, names in shards.items():
        save_file({k: bare[k].contiguous() for k in names}, tmp_path / "sharded" / name)
    index = {"weight_map": {k: name for name, names in shards.items() for k in names}}
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text(json.dumps(index))
    assert rel_err(HMTModel.from_hmt_pytorch(tmp_path / "sharded", folder, **sizes)(ids).logits, expected) < 1e-9


# ------------------------------------------------------------------------------------------ clear errors
def _without(state, key):
    return {k: v for k, v in state.items() if k != key}


BAD_CHECKPOINTS = {
    "missing W_k": (lambda s: _without(s, "module.cross_attn.wk.weight"), "missing key 'cross_attn.wk.weight'"),
    "stage 1": (lambda s: {k: v for k, v in s.items() if "cross_attn" not in k and k != "module.mem"}, "stage_1"),
    "unexpected": (lambda s: {**s, "module.extra.weight": torch.zeros(2)}, "unexpected keys 'extra.weight'"),
    "mixed prefix": (lambda s: {**_without(s, "module.mem"), "mem": s["module.mem"]}, "prefix"),
    "backbone key": (lambda s: _without(s, "module.memory_cell.model.model.norm.weight"),
                     "missing backbone keys 'memory_cell.model.model.norm.weight'"),
    "shape": (lambda s: {**s, "module.mem": torch.zeros(1, 7)}, r"'mem' .* shape \(1, 7\); expected \(1, 32\)"),
    "dtype": (lambda s: {**s, "module.cross_attn.wq.weight": torch.zeros(RECALL_DIM, 32, dtype=torch.long)},
              "dtype torch.int64"),
    "nan": (lambda s: {**s, "module.memory_cell.model.model.norm.weight": torch.full((32,), float("nan"))},
            "NaN"),
    "recall_dim": (lambda s: {**s, "module.cross_attn.wq.weight": torch.zeros(8, 32)},
                   r"shape \(8, 32\); expected \(16, 32\)"),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_bad_checkpoints_are_named(tmp_path, case):
    state, _ = reference_checkpoint("llama")
    damage, match = BAD_CHECKPOINTS[case]
    with pytest.raises(ValueError, match=match):
        convert(tmp_path, damage(state))


def test_bad_lora_checkpoints_are_named(tmp_path):
    state, _ = reference_checkpoint("llama", lora=True)
    prefix = "module.memory_cell.model.base_model.model.model.layers.0.self_attn.q_proj."
    with pytest.raises(ValueError, match="missing key .*q_proj.lora_B.default.weight"):
        convert(tmp_path, _without(state, prefix + "lora_B.default.weight"))
    renamed = {k.replace("lora_A.default", "lora_A.other"): v for k, v in state.items()}
    with pytest.raises(ValueError, match="'default'"):
        convert(tmp_path, renamed)
    bad = {**state, prefix + "lora_A.default.weight": torch.zeros(8, 5)}
    with pytest.raises(ValueError, match=r"q_proj.lora_A.default.weight' has shape \(8, 5\); expected \(8, 32\)"):
        convert(tmp_path, bad)


def test_wrong_backbone_is_named(tmp_path):
    state, _ = reference_checkpoint("opt")
    with pytest.raises(ValueError, match="another backbone"):
        convert(tmp_path, state, family="llama")


@pytest.mark.parametrize("kwargs, match", [
    (dict(sum_fraction=0.0), "sum_fraction"), (dict(sum_fraction=1.5), "sum_fraction"),
    (dict(sum_fraction=0.01), "at least 1"), (dict(lora_alpha=-1), "lora_alpha"),
    (dict(recall_scale="cube"), "recall_scale"), (dict(dtype="int8"), "dtype"), (dict(window=4), "window"),
])
def test_bad_arguments_are_named(tmp_path, kwargs, match):
    state, _ = reference_checkpoint("llama")
    with pytest.raises(ValueError, match=match):
        convert(tmp_path, state, **kwargs)


def test_pickled_objects_are_refused_unrun(tmp_path):
    """A .pth is read with weights_only=True: an object that would run code when unpickled is refused."""
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"mem": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="weights_only=True"):
        convert_module.read_state_dict(tmp_path / "evil.pth")
    assert not marker.exists()
    torch.save({"mem": torch.zeros(2), "step": 3}, tmp_path / "mixed.pth")
    with pytest.raises(ValueError, match="entry 'step' is a int"):
        convert_module.read_state_dict(tmp_path / "mixed.pth")


def test_deepspeed_zero_folder_asks_for_zero_to_fp32(tmp_path):
    folder = tmp_path / "ckpt"
    (folder / "global_step100").mkdir(parents=True)
    (folder / "latest").write_text("global_step100")
    torch.save({"module": {}}, folder / "global_step100" / "mp_rank_00_model_states.pt")
    for path in (folder, folder / "global_step100", folder / "global_step100" / "mp_rank_00_model_states.pt"):
        with pytest.raises(ValueError, match="zero_to_fp32.py"):
            convert_module.read_state_dict(path)


def test_cli_errors_are_one_line(tmp_path, capsys):
    folder = save_backbone_folder(tmp_path / "backbone")
    state, _ = reference_checkpoint("llama")
    torch.save(_without(state, "module.memory_cell.memory"), tmp_path / "bad.pth")
    (tmp_path / "zero").mkdir()
    (tmp_path / "zero" / "latest").write_text("global_step1")
    (tmp_path / "file").write_text("x")
    capsys.readouterr()
    cases = [
        (cli_args(tmp_path / "bad.pth", folder, tmp_path / "out"), "missing key 'memory_cell.memory'"),
        (cli_args(tmp_path / "zero", folder, tmp_path / "out"), "zero_to_fp32.py"),
        (cli_args(tmp_path / "absent.pth", folder, tmp_path / "out"), "does not exist"),
        (cli_args(tmp_path / "bad.pth", tmp_path / "nowhere", tmp_path / "out"), "config.json"),
        (cli_args(tmp_path / "bad.pth", folder, tmp_path / "file"), "is a file"),
        (cli_args(tmp_path / "bad.pth", folder, tmp_path / "out", "--sum-fraction", "nan"), "sum_fraction"),
    ]
    for argv, match in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("hmt convert: ") and match in err and err.count("\n") == 1, err
        assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_converted_linear_checkpoint_can_be_fine_tuned_from(tmp_path):
    """Training has no recall_scale option: a run started from a converted checkpoint keeps the checkpoint's."""
    from hmt_runtime.model.convert import convert_hmt_pytorch
    from hmt_runtime.training.train import TrainConfig, build_model

    state, _ = reference_checkpoint("llama")
    torch.save(state, tmp_path / "model_weights_1.pth")
    folder = save_backbone_folder(tmp_path / "backbone")
    convert_hmt_pytorch(tmp_path / "model_weights_1.pth", folder, tmp_path / "converted", window=WINDOW,
                        sensory_tokens=SENSORY, recall_dim=RECALL_DIM, memory_slots=SLOTS, recall_scale="linear")
    config = TrainConfig(init_from=str(tmp_path / "converted"), window=WINDOW, sensory_tokens=SENSORY,
                         memory_slots=SLOTS, recall_dim=RECALL_DIM, recall="paper", mode="frozen")
    assert build_model(config).config.recall_scale == "linear"
    with pytest.raises(ValueError, match="memory_slots"):
        build_model(TrainConfig(init_from=config.init_from, window=WINDOW, sensory_tokens=SENSORY, memory_slots=5,
                                recall_dim=RECALL_DIM, recall="paper", mode="frozen"))
