"""The `hmt` command: generate, info, serve, convert (and train / eval when those modules are present)."""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import torch

from .core.checks import check_output_dir, int_at_least
from .core.config import DEFAULT_RECALL, RECALL_MODES, SERVE_LIMITS


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error printed as one line (and exit status 2)."""

    def error(self, message: str):
        print(f"{self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default",
                        help="'default' (the trained HMT for SmolLM2-135M), an HMT checkpoint folder, "
                             "'smollm2-135m' or a transformers model folder (fresh HMT parameters, warm-started)")
    parser.add_argument("--window", type=int_at_least(3), default=256,
                        help="backbone window W for a fresh HMT (default 256)")
    parser.add_argument("--sensory-tokens", type=int_at_least(0), default=32)
    parser.add_argument("--memory-slots", type=int_at_least(1), default=300)
    parser.add_argument("--recall", choices=RECALL_MODES, default=DEFAULT_RECALL,
                        help=f"recall mode for a fresh HMT, as HMTConfig.recall (default {DEFAULT_RECALL}; a "
                             "checkpoint records its own)")
    parser.add_argument("--kernels", choices=("auto", "torch", "triton", "native"), default=None)
    parser.add_argument("--weights", choices=("fp32", "bf16", "int8", "q4"), default=None,
                        help="storage of the backbone's linear weights; q4 runs the default backbone's GGUF blocks "
                             "as stored (default: q4 for the default backbone, whose weights they are, else fp32)")
    parser.add_argument("--threads", type=int_at_least(1), default=None,
                        help="torch CPU threads (default: torch's choice)")


def load_model(args):
    from .core.config import HMTConfig
    from .model.hmt import CONFIG_NAME, DEFAULT_DIR, HMTModel
    from .model.loading import default_weights, load_backbone

    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.model
    if name not in ("default", "smollm2-135m") and not Path(name).is_dir():
        what = "is a file" if Path(name).exists() else "does not exist"
        raise FileNotFoundError(f"--model {name!r} {what}; expected 'default', 'smollm2-135m', an HMT checkpoint "
                                "folder or a transformers model folder")
    if name == "default" and not (DEFAULT_DIR / CONFIG_NAME).is_file():
        print("hmt: no trained default weights installed; using SmolLM2-135M with fresh HMT parameters",
              file=sys.stderr)
        name = "smollm2-135m"
    if name == "default" or (Path(name) / CONFIG_NAME).is_file():
        return HMTModel.from_pretrained(name, kernels=args.kernels, weights=getattr(args, "weights", None))
    weights = getattr(args, "weights", None) or default_weights(name)
    backbone, tokenizer = load_backbone(name, weights=weights)
    config = HMTConfig.from_window(args.window, sensory_tokens=args.sensory_tokens, memory_slots=args.memory_slots,
                                   recall_dim=1536, recall=args.recall, kernels=args.kernels or "auto")
    model = HMTModel(backbone, config, tokenizer=tokenizer)
    model.warm_start()
    return model.eval()


def cmd_generate(args) -> int:
    from .incremental.generation import generate, ingest
    from .incremental.requests import TextPieces
    from .core.checks import check_text

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
    try:
        check_text(text, "--prompt" if args.prompt is not None else "--prompt-file")
    except ValueError as err:
        print(f"hmt generate: {err}", file=sys.stderr)
        return 2
    if not text.strip():
        print("hmt generate: the prompt is empty", file=sys.stderr)
        return 2
    if args.max_new_tokens < 0:
        print(f"hmt generate: --max-new-tokens {args.max_new_tokens}: expected >= 0", file=sys.stderr)
        return 2
    started = time.perf_counter()
    model = load_model(args)
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ValueError(f"--model {args.model!r} has no tokenizer files; expected a model folder with a tokenizer")
    ids = leading_ids(tokenizer, text, args.prompt_tokens)
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
    # the prompt's last 200 tokens, then the new ones, decoded as one text (so nothing of the prompt is lost
    # and a character split across the boundary prints whole)
    shown = ids[0, -ECHO_TOKENS:].tolist()
    echo = TextPieces(tokenizer)
    print(("..." if ids.shape[1] > ECHO_TOKENS else "") + echo.update(shown), end="", flush=True)
    prompt = last if last is not None else ids
    t1 = time.perf_counter()
    # the scheduler's decode path; a 1-D id prompt streams lists of new ids
    chunks = generate(model, prompt[0], max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                      temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                      eos_token_id=tokenizer.eos_token_id, state=state, stream=True)
    new = []
    for chunk in chunks:
        new.extend(chunk)
        if args.stream:
            print(echo.update(shown + new), end="", flush=True)
    print(echo.update(shown + new, final=True))
    gen_s = time.perf_counter() - t1
    print(f"\ngenerated {len(new)} tokens in {gen_s:.1f} s ({len(new) / max(gen_s, 1e-9):.2f} tok/s); "
          f"peak memory {peak_rss_mb():.0f} MiB", file=sys.stderr)
    return 0


ECHO_TOKENS = 200  # prompt tokens echoed before the continuation
_TOKEN_MARGIN = 16  # ids past the wanted ones that a prefix must give, so its first ids are the whole text's


def leading_ids(tokenizer, text: str, count: int | None):
    """The first ``count`` token ids of ``text`` (all of them for None) as a (1, L) tensor, tokenizing only as
    much of the text as they need (a prefix a few times their length, doubled until it yields ``count`` ids and a
    margin past them, since the ids of a prefix equal the whole text's away from where it is cut): a prompt file
    much longer than ``--prompt-tokens`` costs the memory of its prefix, not of its whole tokenization."""
    chars = len(text) if count is None else min(len(text), 8 * count + 64)
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False, return_tensors="pt").input_ids
        if chars >= len(text) or ids.shape[1] >= count + _TOKEN_MARGIN:
            return ids if count is None else ids[:, :count]
        chars = min(len(text), 2 * chars)


def memory_budget(model) -> dict:
    """Bytes held for one sequence: the KV cache (W positions, and the replayed slots' ids with ``replay``), the
    memory ring buffer with its keys and, with ``replay``, each slot's window ids."""
    from .core.backbones import unwrap

    cfg = unwrap(model.backbone).config.get_text_config()
    layers = cfg.num_hidden_layers
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    item = torch.finfo(model.dtype).bits // 8
    kv = 2 * layers * heads * head_dim * model.config.kv_window * item
    ring = model.config.memory_slots * ((model.width + model.config.recall_dim) * item + model.config.slot_tokens * 8)
    params = sum(p.numel() for p in model.backbone.parameters()) * item
    hmt = sum(p.numel() for p in model.hmt_state_dict().values()) * item
    return {"kv_cache": kv, "memory_ring": ring, "backbone_weights": params, "hmt_parameters": hmt}


def cmd_info(args) -> int:
    from .core.backbones import unwrap

    model = load_model(args)
    inner = unwrap(model.backbone)
    print(f"backbone: {type(inner).__name__} ({model.backbone_identity()})")
    print(f"HMT config: {model.config.describe()}")
    print(f"embedding width d = {model.width}, dtype {model.dtype}, backend {model.prepare_ops().name}")
    for name, size in memory_budget(model).items():
        print(f"  {name:>18}: {size / 2**20:10.2f} MiB")
    print("per sequence, the KV cache and memory ring are all that grow with the batch; neither grows with the input")
    return 0


def cmd_serve(args) -> int:
    from .core.backbones import cache_dir

    try:
        from .serving.server import serve
    except ModuleNotFoundError as err:
        raise ImportError(f"the server needs {err.name!r}, which is not installed: pip install fastapi uvicorn "
                          "prometheus-client (all in requirements.txt)") from err

    if args.port > 65535:
        raise ValueError(f"--port {args.port}: expected a port number in [0, 65535]")
    memory_dir = Path(args.memory_dir) if args.memory_dir else cache_dir() / "memories"
    check_output_dir("--memory-dir", memory_dir)
    name = args.served_model_name or (Path(args.model).name if Path(args.model).is_dir() else args.model)
    model = load_model(args)
    api_key = args.api_key if args.api_key is not None else os.environ.get("HMT_API_KEY") or None
    if api_key is not None and not api_key.strip():
        raise ValueError("--api-key: expected a non-empty key")
    if args.max_tokens_limit and args.default_max_tokens > args.max_tokens_limit:
        raise ValueError(f"--default-max-tokens {args.default_max_tokens} exceeds --max-tokens-limit "
                         f"{args.max_tokens_limit}")
    serve(model, host=args.host, port=args.port, log_level=args.log_level, rows=args.rows,
          max_queue=args.max_queue, memory_dir=memory_dir, model_name=name,
          default_max_tokens=args.default_max_tokens, engine=args.engine, api_key=api_key,
          allowed_hosts=args.allowed_host, max_request_bytes=args.max_request_bytes,
          max_prompt_tokens=args.max_prompt_tokens, max_document_tokens=args.max_document_tokens,
          max_tokens_limit=args.max_tokens_limit, max_memories=args.max_memories,
          chunk_tokens=args.prefill_chunk_tokens, drain_seconds=args.drain_seconds)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hmt", description="Hierarchical Memory Transformer runtime")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="ingest a prompt (any length) and continue it")
    gen.add_argument("--prompt", help="prompt text")
    gen.add_argument("--prompt-file", help="read the prompt from this UTF-8 text file")
    gen.add_argument("--prompt-tokens", type=int_at_least(1), default=None,
                     help="use only the first N (>= 1) tokens of the prompt")
    gen.add_argument("--max-new-tokens", type=int_at_least(0), default=64)
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
    srv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching and memories")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=int_at_least(0), default=8000)
    srv.add_argument("--rows", "--max-running", dest="rows", type=int_at_least(1), default=8,
                     help="sequences decoded together (scheduler rows; default 8)")
    srv.add_argument("--max-queue", type=int_at_least(0), default=64,
                     help="requests that may wait for a row; more are answered 429 (default 64)")
    srv.add_argument("--memory-dir", default=None,
                     help="folder of memory states, may be shared by several servers "
                          "(default: $HMT_CACHE/memories, else ~/.cache/hmt/memories)")
    srv.add_argument("--served-model-name", default=None,
                     help="the model id clients pass (default: the --model value, or a checkpoint folder's name)")
    srv.add_argument("--default-max-tokens", type=int_at_least(1), default=256,
                     help="max_tokens of a chat request that gives none (default 256; completions: 16)")
    srv.add_argument("--api-key", default=None,
                     help="require 'Authorization: Bearer KEY' on every endpoint but /health (default: $HMT_API_KEY; "
                          "none: no key)")
    srv.add_argument("--allowed-host", action="append", default=None, metavar="NAME",
                     help="also serve requests whose Host header names NAME (repeatable; '*': any). A loopback bind "
                          "serves only localhost, 127.0.0.1 and ::1 by default (stops DNS rebinding)")
    srv.add_argument("--max-request-bytes", type=int_at_least(0), default=SERVE_LIMITS["max_request_bytes"],
                     help=f"larger request bodies are refused with 413 (default {SERVE_LIMITS['max_request_bytes']}; 0: no limit)")
    srv.add_argument("--max-prompt-tokens", type=int_at_least(0), default=SERVE_LIMITS["max_prompt_tokens"],
                     help=f"tokens per prompt (default {SERVE_LIMITS['max_prompt_tokens']}; 0: no limit)")
    srv.add_argument("--max-document-tokens", type=int_at_least(0), default=SERVE_LIMITS["max_document_tokens"],
                     help=f"tokens per document sent to /v1/memories (default {SERVE_LIMITS['max_document_tokens']}; "
                          "0: no limit)")
    srv.add_argument("--max-tokens-limit", type=int_at_least(0), default=SERVE_LIMITS["max_tokens_limit"],
                     help=f"the largest max_tokens a request may ask (default {SERVE_LIMITS['max_tokens_limit']}; 0: no limit)")
    srv.add_argument("--max-memories", type=int_at_least(0), default=SERVE_LIMITS["max_memories"],
                     help=f"memory files kept; a new one removes the least recently used beyond this (default "
                          f"{SERVE_LIMITS['max_memories']}; 0: no cap)")
    srv.add_argument("--prefill-chunk-tokens", type=int_at_least(1), default=None,
                     help="tokens of a prompt or document read per engine step between decode steps (default: one "
                          "segment)")
    srv.add_argument("--drain-seconds", type=float, default=30.0,
                     help="on SIGTERM, how long running requests may finish before they are ended (default 30)")
    srv.add_argument("--engine", choices=("auto", "lean", "transformers"), default="auto")
    srv.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"), default="info")
    add_model_arguments(srv)
    srv.set_defaults(func=cmd_serve)
    for module, hook in (("training.train", "add_train_parser"), ("training.evaluate", "add_eval_parser"),
                         ("training.corpus", "add_data_parser"), ("model.convert", "add_convert_parser")):
        try:
            mod = __import__(f"hmt_runtime.{module}", fromlist=[hook])
        except ImportError:
            continue
        if hasattr(mod, hook):
            getattr(mod, hook)(sub)
    return parser


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if isinstance(err, (ValueError, OSError)) else f"{type(err).__name__}: {text}"


def main(argv=None) -> int:
    """Run the ``hmt`` command.  Every error is one line on stderr and a non-zero exit status (2: bad input or a
    file problem, 1: anything else, 130: interrupted), never a traceback (``HMT_DEBUG=1`` shows them); a closed
    output pipe (``| head``) ends the command quietly."""
    args = build_parser().parse_args(argv)
    command = f"hmt {args.command}"
    try:
        threads = getattr(args, "threads", None)
        if threads is not None and (isinstance(threads, bool) or threads < 1):
            raise ValueError(f"--threads {threads}: expected an integer >= 1")
        if getattr(args, "output_dir", None) is not None:
            check_output_dir("--output-dir", args.output_dir)
        return args.func(args)
    except BrokenPipeError:
        # the reader went away (`hmt generate | head`): stop quietly; point stdout at /dev/null so that the
        # interpreter's final flush does not complain again
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except OSError:
            pass
        return 141  # as a process ended by SIGPIPE
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if os.environ.get("HMT_DEBUG"):
            raise
        print(f"{command}: {_one_line(err)}", file=sys.stderr)
        return 2 if isinstance(err, (ValueError, TypeError, OSError, KeyError, ImportError)) else 1


if __name__ == "__main__":
    sys.exit(main())
