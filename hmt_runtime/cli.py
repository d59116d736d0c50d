"""The `hmt` command: generate, info (and train / eval when those modules are present)."""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default",
                        help="'default' (the trained HMT for SmolLM2-135M), an HMT checkpoint folder, "
                             "'smollm2-135m' or a transformers model folder (fresh HMT parameters, warm-started)")
    parser.add_argument("--window", type=int, default=256, help="backbone window W for a fresh HMT (default 256)")
    parser.add_argument("--sensory-tokens", type=int, default=32)
    parser.add_argument("--memory-slots", type=int, default=300)
    parser.add_argument("--recall", choices=("paper", "causal"), default="causal",
                        help="recall mode for a fresh HMT (a checkpoint records its own)")
    parser.add_argument("--kernels", choices=("auto", "torch", "triton", "native"), default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def load_model(args):
    from . import HMTConfig, HMTModel, load_backbone
    from .model import CONFIG_NAME, DEFAULT_DIR

    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.model
    if name == "default" and not (DEFAULT_DIR / CONFIG_NAME).is_file():
        print("hmt: no trained default weights installed; using SmolLM2-135M with fresh HMT parameters",
              file=sys.stderr)
        name = "smollm2-135m"
    if name == "default" or (Path(name) / CONFIG_NAME).is_file():
        return HMTModel.from_pretrained(name, kernels=args.kernels)
    backbone, tokenizer = load_backbone(name)
    config = HMTConfig.from_window(args.window, sensory_tokens=args.sensory_tokens, memory_slots=args.memory_slots,
                                   recall_dim=1536, recall=args.recall, kernels=args.kernels or "auto")
    model = HMTModel(backbone, config, tokenizer=tokenizer)
    model.warm_start()
    return model.eval()


def cmd_generate(args) -> int:
    from .api import generate
    from .segment import ingest

    if (args.prompt is None) == (args.prompt_file is None):
        print("hmt generate: give exactly one of --prompt TEXT or --prompt-file FILE", file=sys.stderr)
        return 2
    if args.prompt_file is not None:
        try:
            text = Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            print(f"hmt generate: cannot read --prompt-file {args.prompt_file!r}: {err}", file=sys.stderr)
            return 2
    else:
        text = args.prompt
    if not text.strip():
        print("hmt generate: the prompt is empty", file=sys.stderr)
        return 2
    if args.max_new_tokens < 0:
        print(f"hmt generate: --max-new-tokens {args.max_new_tokens}: expected >= 0", file=sys.stderr)
        return 2
    started = time.perf_counter()
    model = load_model(args)
    tokenizer = model.tokenizer
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    if args.prompt_tokens:
        ids = ids[:, : args.prompt_tokens]
    load_s = time.perf_counter() - started
    print(f"model loaded in {load_s:.1f} s; {model.config.describe()}", file=sys.stderr)

    t0 = time.perf_counter()
    state = None
    body, last = ids, None
    if ids.shape[1] > 1:
        # ingest all but the last token with a progress bar; generation then feeds the last one
        state, _ = ingest(model, ids[:, :-1], progress=True)
        body, last = ids[:, :-1], ids[:, -1:]
    ingest_s = time.perf_counter() - t0
    n_ingested = body.shape[1] if state is not None else 0
    if n_ingested:
        print(f"ingested {n_ingested} tokens in {ingest_s:.1f} s ({n_ingested / ingest_s:.1f} tok/s), "
              f"{int(state.segments_done[0])} segments, memory slots used {min(int(state.written[0]), model.config.memory_slots)}",
              file=sys.stderr)
    tail = tokenizer.decode(body[0, -200:]) if n_ingested else ""
    if tail:
        print(f"...{tail}", end="", flush=True)
    prompt = last if last is not None else ids
    t1 = time.perf_counter()
    # the scheduler's decode path; a 1-D id prompt streams lists of new ids
    chunks = generate(model, prompt[0], max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                      temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                      eos_token_id=tokenizer.eos_token_id, state=state, stream=True)
    new, shown = [], ""
    for chunk in chunks:
        new.extend(chunk)
        if args.stream:
            text_so_far = tokenizer.decode(new, skip_special_tokens=True)
            print(text_so_far[len(shown):], end="", flush=True)
            shown = text_so_far
    gen_s = time.perf_counter() - t1
    if not args.stream:
        print(tokenizer.decode(new, skip_special_tokens=True))
    else:
        print()
    print(f"\ngenerated {len(new)} tokens in {gen_s:.1f} s ({len(new) / max(gen_s, 1e-9):.2f} tok/s); "
          f"peak memory {peak_rss_mb():.0f} MiB", file=sys.stderr)
    return 0


def memory_budget(model) -> dict:
    """Bytes held for one sequence: the KV cache of W positions, the memory ring buffer and keys."""
    from .backbones import unwrap

    cfg = unwrap(model.backbone).config.get_text_config()
    layers = cfg.num_hidden_layers
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    item = torch.finfo(model.dtype).bits // 8
    kv = 2 * layers * heads * head_dim * model.config.window * item
    ring = model.config.memory_slots * (model.width + model.config.recall_dim) * item
    params = sum(p.numel() for p in model.backbone.parameters()) * item
    hmt = sum(p.numel() for p in (model.summary_prompt, model.memory_init, *model.recall.parameters())) * item
    return {"kv_cache": kv, "memory_ring": ring, "backbone_weights": params, "hmt_parameters": hmt}


def cmd_info(args) -> int:
    from .backbones import unwrap

    model = load_model(args)
    inner = unwrap(model.backbone)
    print(f"backbone: {type(inner).__name__} ({model.backbone_identity()})")
    print(f"HMT config: {model.config.describe()}")
    print(f"embedding width d = {model.width}, dtype {model.dtype}, backend {model.ops().name}")
    for name, size in memory_budget(model).items():
        print(f"  {name:>18}: {size / 2**20:10.2f} MiB")
    print("per sequence, the KV cache and memory ring are all that grow with the batch; neither grows with the input")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hmt", description="Hierarchical Memory Transformer runtime")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="ingest a prompt (any length) and continue it")
    gen.add_argument("--prompt", help="prompt text")
    gen.add_argument("--prompt-file", help="read the prompt from this UTF-8 text file")
    gen.add_argument("--prompt-tokens", type=int, default=None, help="use only the first N tokens of the prompt")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    gen.add_argument("--do-sample", action="store_true")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    add_model_arguments(gen)
    gen.set_defaults(func=cmd_generate)
    info = sub.add_parser("info", help="print the model, its config and its memory budget")
    add_model_arguments(info)
    info.set_defaults(func=cmd_info)
    for module, hook in (("train", "add_train_parser"), ("evaluate", "add_eval_parser")):
        try:
            mod = __import__(f"hmt_runtime.{module}", fromlist=[hook])
        except ImportError:
            continue
        if hasattr(mod, hook):
            getattr(mod, hook)(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, TypeError) as err:
        print(f"hmt {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
