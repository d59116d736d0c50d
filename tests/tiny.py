"""Tiny random backbones of several families for fast CPU tests."""
import torch
from transformers import (
    GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, OPTConfig,
    OPTForCausalLM, Qwen2Config, Qwen2ForCausalLM,
)

VOCAB = 97
FAMILIES = ("llama", "qwen2", "mistral", "gpt2", "opt")


def tiny_backbone(family: str = "llama", seed: int = 0, dtype=torch.float64):
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "llama":
        cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=512, **common)
        model = LlamaForCausalLM(cfg)
    elif family == "qwen2":
        cfg = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=1, max_position_embeddings=512, **common)
        model = Qwen2ForCausalLM(cfg)
    elif family == "mistral":
        cfg = MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=512, sliding_window=None, **common)
        model = MistralForCausalLM(cfg)
    elif family == "gpt2":
        cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=512, **common)
        model = GPT2LMHeadModel(cfg)
    elif family == "opt":
        cfg = OPTConfig(hidden_size=32, word_embed_proj_dim=24, ffn_dim=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=512, **common)
        model = OPTForCausalLM(cfg)
    else:
        raise ValueError(family)
    return model.to(dtype).eval()
