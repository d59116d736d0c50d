"""Convergence (in Liger-Kernel's sense): a tiny randomly initialised HMT learns to give back a key read four or
more segments earlier, through the training objective (``LastSegmentLoss`` with ``prompt_end`` and answer
labels), with recall at the end of the prompt.  It separates "the semantics or the training path cannot" from
"a real backbone needs more": if this fails, retrieval cannot be learnt at any scale."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hmt_runtime import HMTConfig, HMTModel
from hmt_runtime.training.objective import LastSegmentLoss

KEYS, MARK, ASK, FILLER0, VOCAB = 10, 10, 11, 12, 40  # ids 0-9 keys, 10 "key:", 11 "key?", 12-39 filler
LS, K, J, N = 8, 2, 4, 16


def tiny_hmt(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    hmt = HMTConfig(segment_tokens=LS, sensory_tokens=K, summary_tokens=J, memory_slots=N, recall_dim=32,
                    recall="causal", kernels="torch", prompt_recall=True)
    return HMTModel(LlamaForCausalLM(cfg), hmt)


def batch(gen, size, segments):
    """A key after the marker somewhere in segment 0; filler; the question as the prompt's last id in the last
    segment, the key as the answer (the only scored id)."""
    length = (segments - 1) * LS + LS // 2
    ids = torch.randint(FILLER0, VOCAB, (size, length + 1), generator=gen)
    keys = torch.randint(0, KEYS, (size,), generator=gen)
    at = torch.randint(0, LS - 2 - K, (size,), generator=gen)
    rows = torch.arange(size)
    ids[rows, at], ids[rows, at + 1] = MARK, keys
    ids[:, length - 1], ids[:, length] = ASK, keys
    labels = torch.full_like(ids, -100)
    labels[:, length] = keys
    return ids, torch.full((size,), length), labels


@torch.no_grad()
def accuracy(model, gen, segments, size=256):
    ids, prompt_end, labels = batch(gen, size, segments)
    logits = model(ids, prompt_end=prompt_end).logits[:, -2]
    return float((logits.argmax(-1) == labels[:, -1]).float().mean())


def test_tiny_hmt_learns_to_recall_a_key_from_far_segments(one_thread):
    model = tiny_hmt()
    objective = LastSegmentLoss(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    for step in range(200):
        segments = 2 if step < 100 else 3  # short distances first; tested at 4 and 7 segments back
        ids, prompt_end, labels = batch(gen, 64, segments)
        loss = objective(ids, use_recall=True, prompt_end=prompt_end, labels=labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    check = torch.Generator().manual_seed(1)
    assert accuracy(model, check, 5) >= 0.9  # key 4 segments before the question: never trained; chance 0.1
    assert accuracy(model, check, 8) >= 0.8  # 7 segments back
