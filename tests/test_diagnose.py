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
