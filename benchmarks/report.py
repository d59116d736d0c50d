"""Turn a pytest-benchmark JSON of bench_generate.py into markdown tables and PNG plots.

    python benchmarks/report.py benchmarks/generation.json [--plots benchmarks] [--markdown out.md]

Plots: ``generation_memory.png`` (peak RSS vs context) and ``generation_speed.png`` (decode and ingestion
tokens/s vs context), HMT and transformers on the same axes.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

HMT, HF = "hmt", "transformers"


def _rows(data: dict) -> list[dict]:
    return [dict(b["extra_info"], _name=b["name"]) for b in data["benchmarks"]]


def _by(rows, prefix, impl):
    return {r["context"]: r for r in rows if r["_name"].startswith(prefix) and r.get("impl") == impl}


def _fmt(value, digits=1):
    return "—" if value is None else f"{value:,.{digits}f}"


def _ratio(a, b):
    return None if a is None or b is None else a / b


def _ctx(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def tables(data: dict) -> str:
    rows = _rows(data)
    gen_h, gen_t = _by(rows, "test_generate_hmt", HMT), _by(rows, "test_generate_transformers", HF)
    mem_h, mem_t = _by(rows, "test_peak_rss_hmt", HMT), _by(rows, "test_peak_rss_transformers", HF)
    anatomy = next((r for r in rows if r["_name"] == "test_decode_step_anatomy"), None)
    any_row = next(iter(rows), {})
    machine = any_row.get("machine", {})
    hf_cap = None
    lines = []
    lines.append(f"Backbone: {any_row.get('backbone', '?')}; HMT window W = {any_row.get('window', '?')}; "
                 f"{machine.get('cpus', '?')} CPU cores, {machine.get('threads', '?')} torch threads, "
                 f"torch {machine.get('torch', '?')}.")
    loads = sorted({tuple(r["machine"]["load_avg"]) for r in rows if "machine" in r})
    if loads:
        lines.append(f"Load average (1/5/15 min) when the points ran: from {list(loads[0])} to {list(loads[-1])}.")
    lines.append("")
    lines.append("| context | HMT decode tok/s | transformers decode tok/s | ratio | HMT ingest tok/s | "
                 "transformers prefill tok/s | ratio |")
    lines.append("|---|---|---|---|---|---|---|")
    for ctx in sorted(set(gen_h) | set(gen_t)):
        h, t = gen_h.get(ctx, {}), gen_t.get(ctx, {})
        hd, td = h.get("decode_tok_s"), t.get("decode_tok_s")
        hi, ti = h.get("ingest_tok_s"), t.get("ingest_tok_s")
        lines.append(f"| {_ctx(ctx)} | {_fmt(hd)} | {_fmt(td)} | {_fmt(_ratio(hd, td), 2)}x | {_fmt(hi, 0)} | "
                     f"{_fmt(ti, 0)} | {_fmt(_ratio(hi, ti), 2)}x |")
    lines.append("")
    lines.append("| context ingested | HMT peak RSS (MB) | transformers peak RSS (MB) | HMT ingest time (s) |")
    lines.append("|---|---|---|---|")
    for ctx in sorted(set(mem_h) | set(mem_t)):
        h, t = mem_h.get(ctx, {}), mem_t.get(ctx, {})
        hf_text = _fmt(t.get("peak_rss_mb"), 0) if t else "cannot (stops at 8192 positions)"
        lines.append(f"| {_ctx(ctx)} | {_fmt(h.get('peak_rss_mb'), 0)} | {hf_text} | {_fmt(h.get('seconds'), 0)} |")
    if mem_h:
        peaks = [r["peak_rss_mb"] for r in mem_h.values()]
        lines.append("")
        lines.append(f"HMT peak RSS spread over {len(peaks)} contexts: {100 * (max(peaks) - min(peaks)) / min(peaks):.1f}% "
                     f"({min(peaks):,.0f} to {max(peaks):,.0f} MB).")
    if anatomy:
        a = anatomy
        lines.append("")
        lines.append("| decode step (per token) | ms |")
        lines.append("|---|---|")
        lines.append(f"| HMT scheduler step (boundary events amortised, engine {a['engine']}) | {a['step_ms']:.1f} |")
        lines.append(f"| the same backbone forward alone (lean engine, no HMT work) | {a['lean_forward_ms']:.1f} |")
        lines.append(f"| transformers backbone forward (DynamicCache, {a['window'] // 2} cached) | {a['hf_forward_ms']:.1f} |")
        lines.append(f"| GEMV chain over all {a['weight_mb']:.0f} MB of weights (weight-read bound) | {a['gemv_bound_ms']:.1f} |")
        lines.append("")
        lines.append(f"Pure HMT overhead: {a['overhead_vs_lean_ms']:.1f} ms per token over the lean forward; "
                     f"{a['overhead_vs_hf_ms']:+.1f} ms against transformers' own forward.  The step runs at "
                     f"{100 * a['gemv_bound_ms'] / a['step_ms']:.0f}% of the weight-read bound "
                     f"(weights read at {a['read_gb_s']:.1f} GB/s by a plain sum).")
    return "\n".join(lines)


def plots(data: dict, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _rows(data)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    mem_h, mem_t = _by(rows, "test_peak_rss_hmt", HMT), _by(rows, "test_peak_rss_transformers", HF)
    window = next((r.get("window") for r in rows if r.get("window")), "?")
    fig, ax = plt.subplots(figsize=(6, 4))
    for series, label, style in ((mem_h, f"HMT (window {window})", "o-"), (mem_t, "transformers (full context)", "s--")):
        if series:
            xs = sorted(series)
            ax.plot(xs, [series[x]["peak_rss_mb"] for x in xs], style, label=label)
    if mem_t and mem_h and max(mem_h) > max(mem_t):
        ax.axvline(max(mem_t), color="grey", lw=0.8, ls=":")
        ax.annotate("transformers stops", (max(mem_t), ax.get_ylim()[0]), rotation=90, va="bottom", ha="right",
                    fontsize=8, color="grey")
    ax.set_xscale("log", base=2)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("tokens ingested")
    ax.set_ylabel("peak RSS (MB)")
    ax.set_title("Memory vs context")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = folder / "generation_memory.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)

    gen_h, gen_t = _by(rows, "test_generate_hmt", HMT), _by(rows, "test_generate_transformers", HF)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((left, "decode_tok_s", "Decode tokens/s"), (right, "ingest_tok_s", "Prompt ingestion tokens/s")):
        for series, label, style in ((gen_h, "HMT", "o-"), (gen_t, "transformers", "s--")):
            if series:
                xs = sorted(series)
                ax.plot(xs, [series[x][key] for x in xs], style, label=label)
        if key == "ingest_tok_s" and mem_h:  # the memory runs ingest too, to 128k: one process per point
            xs = sorted(mem_h)
            ax.plot(xs, [mem_h[x]["tok_s"] for x in xs], "o:", color="tab:blue", alpha=0.6,
                    label="HMT (memory runs, own process)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("tokens/s")
        ax.set_ylim(bottom=0)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = folder / "generation_speed.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, help="pytest-benchmark JSON written by --benchmark-json")
    parser.add_argument("--plots", type=Path, default=Path(__file__).resolve().parent, help="folder for the PNGs")
    parser.add_argument("--markdown", type=Path, help="also write the tables to this file")
    args = parser.parse_args(argv)
    if not args.json.is_file():
        parser.error(f"json: {str(args.json)!r} is not a file")
    data = json.loads(args.json.read_text())
    text = tables(data)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    for path in plots(data, args.plots):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
