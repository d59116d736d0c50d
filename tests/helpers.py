"""Shared fixtures of the tests: tiny HMT models, prompt sets, a character tokenizer, and references built on the
teacher-forced forward (the reference every incremental path is checked against)."""
import torch

from hmt_runtime import HMTConfig, HMTModel
from tiny import FAMILIES, VOCAB, tiny_backbone

__all__ = ["FAMILIES", "VOCAB", "CharTokenizer", "forward_greedy", "greedy_positions_matching", "make_model",
           "mixed_prompts", "tiny_backbone"]

SEGMENT = 9  # make_model's default: Ls = 9, k = 3, j = 4, N = 3, W = 14


def make_model(family="llama", recall="causal", seed=0, segment=SEGMENT, sensory=3, summary=4, slots=3, **kw):
    """An HMTModel over a tiny float64 backbone of ``family``, recall projections at a scale that matters."""
    cfg = HMTConfig(segment_tokens=segment, sensory_tokens=sensory, summary_tokens=summary, memory_slots=slots,
                    recall_dim=16, recall=recall, kernels="torch", **kw)
    model = HMTModel(tiny_backbone(family, seed), cfg).double().eval()
    torch.manual_seed(seed + 100)
    with torch.no_grad():  # make the recall weights matter
        model.recall.w_q.weight.normal_(0, 1.0)
        model.recall.w_k.weight.normal_(0, 1.0)
    return model


def mixed_prompts(seed=0, segment=SEGMENT):
    """Lengths inside the first segment, at a boundary, just past one, and several segments long."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (2, segment, segment + 1, 3 * segment + 5)]


@torch.no_grad()
def forward_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding with the teacher-forced forward: each new token is the argmax of ``model(ids)`` at the
    last position.  In causal mode incremental generation must equal it token for token."""
    ids = list(prompt)
    for _ in range(max_new_tokens):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids


@torch.no_grad()
def greedy_positions_matching(model, prompt_len: int, out: torch.Tensor):
    """(i, ok) for each generated token out[0, i]: whether it is the argmax of the forward logits at i - 1."""
    logits = model(out).logits[0]
    return [(i, int(out[0, i]) == int(logits[i - 1].argmax())) for i in range(prompt_len, out.shape[1])]


class CharTokenizer:
    """Characters 32..126 -> ids 0..94, newline -> 95, EOS -> 96."""

    eos_token_id = 96

    def __call__(self, text, add_special_tokens=False):
        class Encoded:
            input_ids = [95 if c == "\n" else ord(c) - 32 for c in text]

        return Encoded()

    def decode(self, ids, skip_special_tokens=True):
        return "".join("\n" if i == 95 else "" if i == 96 else chr(i + 32) for i in ids)
