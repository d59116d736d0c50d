"""Triton recall / memory_write against float64 references (CPU: Triton interpreter, see conftest.py)."""
import pytest
import torch

from hmt_kernels.recall import memory_write, recall
from hmt_runtime.core.ops import memory_write_torch, recall_torch

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def random_state(batch, n_slots, d_model, d_h, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    summary = torch.randn(batch, d_model, generator=g).to(dtype)
    memory = torch.randn(batch, n_slots, d_model, generator=g).to(dtype)
    keys = torch.randn(batch, n_slots, d_h, generator=g).to(dtype)
    w_q = (torch.randn(d_h, d_model, generator=g) / d_model**0.5).to(dtype)
    return summary, memory, keys, w_q


# N = 45 slots: two softmax groups with a tail; d = 70, d_h = 150: several GEMV chunks, tiles with tails.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("written", [[0, 1, 44], [45, 45, 3], [46, 91, 200]], ids=["lt_N", "eq_N", "wrapped"])
def test_recall_matches_reference_into_strided_out(dtype, written):
    batch, n_slots, d_model, d_h = 3, 45, 70, 150
    summary, memory, keys, w_q = random_state(batch, n_slots, d_model, d_h, dtype, seed=sum(written))
    written = torch.tensor(written)
    # P goes into position 2 of a poisoned (B, 5, d) input-embedding buffer: a strided row view.
    embeds = torch.full((batch, 5, d_model), float("nan"), dtype=dtype)
    result = recall(summary, memory, keys, written, w_q, out=embeds[:, 2])
    expected = recall_torch(summary.double(), memory.double(), keys.double(), written, w_q.double())
    assert result.data_ptr() == embeds[:, 2].data_ptr()
    assert not torch.isnan(embeds[:, 2]).any(), "P not fully written"
    assert torch.isnan(embeds[:, [0, 1, 3, 4]]).all(), "recall wrote outside its row"
    err = (embeds[:, 2].double() - expected).abs().max().item()
    assert err < TOL[dtype], f"max error {err}"
    # The scratch is left clean: a second call (new output) gives the same values.
    again = recall(summary, memory, keys, written, w_q)
    assert again.dtype == dtype and torch.equal(again, embeds[:, 2])


def test_recall_sharp_scores_and_many_slots():
    """Large scores (softmax near one-hot) across several groups: the cross-group max must be exact.
    d = 600: two steps of the GEMV's d loop, three of the memory-row loop, with tails."""
    batch, n_slots, d_model, d_h = 2, 130, 600, 40
    summary, memory, keys, w_q = random_state(batch, n_slots, d_model, d_h, torch.float32, seed=5)
    keys = keys * 30
    written = torch.tensor([130, 97])
    expected = recall_torch(summary.double(), memory.double(), keys.double(), written, w_q.double())
    result = recall(summary, memory, keys, written, w_q)
    assert (result.double() - expected).abs().max().item() < 1e-4


def test_memory_write_sequence_wraps_like_reference():
    """Repeated writes (past N, per-row counts differing) leave memory, keys and counts as the reference does.
    d = 530: two steps of the GEMV's d loop; d_h = 150: several chunks, the last one partial."""
    batch, n_slots, d_model, d_h = 2, 5, 530, 150
    g = torch.Generator().manual_seed(1)
    w_k = torch.randn(d_h, d_model, generator=g) / 8
    memory = torch.full((batch, n_slots, d_model), float("nan"))
    keys = torch.full((batch, n_slots, d_h), float("nan"))
    written = torch.tensor([0, 3])
    ref_memory, ref_keys, ref_written = memory.double().clone(), keys.double().clone(), written.clone()
    for step in range(7):
        new = torch.randn(batch, d_model, generator=g)
        memory_write(new, w_k, memory, keys, written)
        memory_write_torch(new.double(), w_k.double(), ref_memory, ref_keys, ref_written)
        assert torch.equal(written, ref_written), f"step {step}: written {written.tolist()}"
    assert written.tolist() == [7, 10]
    torch.testing.assert_close(memory.double(), ref_memory, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(keys.double(), ref_keys, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert not torch.isnan(memory).any() and not torch.isnan(keys).any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_write_then_recall_low_precision(dtype):
    """Writes then a recall, in fp16/bf16, against the float64 reference path on the same inputs."""
    batch, n_slots, d_model, d_h = 2, 7, 40, 96
    g = torch.Generator().manual_seed(2)
    w_q = (torch.randn(d_h, d_model, generator=g) / 6).to(dtype)
    w_k = (torch.randn(d_h, d_model, generator=g) / 6).to(dtype)
    memory = torch.zeros(batch, n_slots, d_model, dtype=dtype)
    keys = torch.zeros(batch, n_slots, d_h, dtype=dtype)
    written = torch.tensor([0, 4])
    for _ in range(9):
        memory_write(torch.randn(batch, d_model, generator=g).to(dtype), w_k, memory, keys, written)
    expected_keys = (memory.double() @ w_k.double().T)
    assert (keys.double() - expected_keys).abs().max().item() < 4 * TOL[dtype] * expected_keys.abs().max().item()
    summary = torch.randn(batch, d_model, generator=g).to(dtype)
    expected = recall_torch(summary.double(), memory.double(), keys.double(), written, w_q.double())
    assert (recall(summary, memory, keys, written, w_q).double() - expected).abs().max().item() < TOL[dtype]


def test_errors_name_the_argument():
    summary, memory, keys, w_q = random_state(2, 4, 8, 16, torch.float32, seed=0)
    written = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="keys has shape \\(2, 4, 15\\), expected \\(2, 4, 16\\)"):
        recall(summary, memory, keys[..., :15], written, w_q)
    with pytest.raises(ValueError, match="written: expected a \\(2,\\) int64 tensor"):
        recall(summary, memory, keys, written.float(), w_q)
    with pytest.raises(ValueError, match="out has shape \\(2, 7\\)"):
        recall(summary, memory, keys, written, w_q, out=torch.empty(2, 7))
    with pytest.raises(ValueError, match="new_memory.dtype=torch.float64"):
        memory_write(summary.double(), w_q, memory, keys, written)


@pytest.mark.parametrize("recall_scale", ["sqrt", "linear"])
def test_recall_honours_the_score_scale(recall_scale):
    """HMTConfig.recall_scale "linear" (scores / d_h) is passed as ``scale`` and honoured by the kernel."""
    from hmt_runtime.core.ops import recall_scale_factor

    batch, n_slots, d_model, d_h = 2, 9, 40, 64
    summary, memory, keys, w_q = random_state(batch, n_slots, d_model, d_h, torch.float32, seed=7)
    keys = keys * 8  # scores large enough that 1/d_h and 1/sqrt(d_h) give clearly different weights
    written = torch.tensor([9, 4])
    scale = recall_scale_factor(recall_scale, d_h)
    expected = recall_torch(summary.double(), memory.double(), keys.double(), written, w_q.double(), scale=scale)
    result = recall(summary, memory, keys, written, w_q, scale=scale)
    assert (result.double() - expected).abs().max().item() < 1e-5
    other = recall_torch(summary.double(), memory.double(), keys.double(), written, w_q.double(),
                         scale=recall_scale_factor("linear" if recall_scale == "sqrt" else "sqrt", d_h))
    assert (other - expected).abs().max().item() > 1e-2  # the scale matters in this case
