"""The diagnosis runs the model's own segment loop: its recall and no-recall streams equal the forward."""
import pytest
import torch
import torch.nn.functional as F

from hmt_runtime.training.diagnose import _stream
from helpers import SEGMENT, VOCAB, make_model


@pytest.mark.parametrize("recall", ["causal", "paper"])
def test_diagnosis_streams_equal_the_forward(recall):
    model = make_model("llama", recall, seed=2)
    ids = torch.randint(0, VOCAB, (1, 4 * SEGMENT + 3), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for variant, use_recall in (("recall", True), ("no-recall", False)):
            logits = model(ids, use_recall=use_recall).logits[0, :-1]
            expected = float(F.cross_entropy(logits.double(), ids[0, 1:], reduction="sum"))
            stats = {}
            assert _stream(model, ids, variant, stats=stats) == pytest.approx(expected, rel=1e-9)
        assert stats == {}  # stats are kept for the "recall" variant only
        stats = {}
        _stream(model, ids, "recall", stats=stats)
        assert len(stats["max_weight"]) == 3 and stats["memories"].shape == (5, model.width)
        others = [_stream(model, ids, v, foreign=list(stats["memories"].double()[:, None].flip(0)))
                  for v in ("uniform", "foreign", "init-only")]
        assert len({round(v, 6) for v in others}) == 3  # each variant changes what is recalled


class CharTokenizer:
    """One id per character (ids 1..96 for printable ASCII), decodable."""
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return type("Encoding", (), {"input_ids": [1 + (ord(c) - 31) % (VOCAB - 1) for c in text]})()

    def decode(self, ids):
        return "".join(chr(31 + i - 1) for i in ids)


def test_memory_use_scores_the_answer_as_the_forward_does():
    from hmt_runtime.training import diagnose, retrieval

    model = make_model("llama", "causal", seed=4, segment=200, sensory=3, summary=8, prompt_recall=True)
    model.tokenizer = CharTokenizer()
    out = diagnose.memory_use(model, batches=1, batch=3, segments=2, seed=7)
    import random

    ids, prompt_end, labels = retrieval.training_batch(model.tokenizer, [], 3, model.config, 2, random.Random(7),
                                                       tasks=("passkey",), split="valid")
    with torch.no_grad():
        logits = model(ids, prompt_end=prompt_end).logits[:, :-1]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert out["answer_ce_own"] == pytest.approx(float(ce), rel=1e-9)
    assert out["answer_ce_other"] != out["answer_ce_own"] and out["answer_ce_none"] != out["answer_ce_own"]


def test_attention_on_memory_reads_the_backbones_attention():
    from hmt_runtime.training import diagnose

    model = make_model("llama", "causal", seed=4, segment=200, sensory=3, summary=8).float()
    model.tokenizer = CharTokenizer()
    model.backbone.config.bos_token_id = 1
    out = diagnose.attention_on_memory(model, batch=2)
    assert 0.0 < out["on_memory"] < 1.0 and 0.0 < out["on_first_sensory"] < 1.0
    assert len(out["on_memory_per_layer"]) == model.backbone.config.num_hidden_layers
    moved = diagnose.attention_on_memory(model, batch=2, read_bias=0.0)  # position 0 is then E(BOS) alone
    assert moved["on_memory"] != out["on_memory"]
    assert model.backbone.config._attn_implementation != "eager"  # restored


def test_read_probe_reads_the_answer_position_of_the_forward():
    """read_probe fits its three probes on the rows it kept (digit answers only) and reports fractions."""
    from hmt_runtime.training import diagnose

    model = make_model("llama", "causal", seed=4, segment=200, sensory=3, summary=8, prompt_recall=True)
    model.tokenizer = CharTokenizer()
    out = diagnose.read_probe(model, samples=24, batch=6, steps=20)
    assert out["samples"] == 24 and out["chance"] == 0.1
    for name in ("memory", "read", "other"):
        assert 0.0 <= out[f"{name}_train_acc"] <= 1.0 and 0.0 <= out[f"{name}_test_acc"] <= 1.0
    # with 18 training rows and features wider than that a linear probe separates the training rows
    assert out["memory_train_acc"] == 1.0
    layered = diagnose.read_probe(model, samples=24, batch=6, steps=20, per_layer=True)
    assert len(layered["layer_test_acc"]) == model.backbone.config.num_hidden_layers
    assert {k: v for k, v in layered.items() if k != "layer_test_acc"} == out  # the hooks change nothing
    assert all(not layer._forward_hooks for layer in model.backbone.model.layers)


def test_memory_names_key_ranks_digits():
    from hmt_runtime.training import diagnose

    model = make_model("llama", "causal", seed=4, segment=200, sensory=3, summary=8)
    model.tokenizer = CharTokenizer()
    out = diagnose.memory_names_key(model, samples=16)
    assert out["samples"] == 16 and 0.0 <= out["top1"] <= 1.0 and 0.0 <= out["mean_rank"] <= 9.0
