"""Markdown table and PNG plots of a serving benchmark run (bench/results/latest.json)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

SERVERS = {
    "server_fp32": "rm-serve fp32",
    "server_int8": "rm-serve int8",
    "naive_server": "naive HTTP server",
    "pytriton": "PyTriton dynamic batcher fp32",
}
OFFLINE = {
    "offline_ort_fp32": "offline ONNX Runtime fp32",
    "offline_ort_int8": "offline ONNX Runtime int8",
    "offline_torch_eager": "offline PyTorch eager",
}
COLORS = {
    "server_fp32": "tab:blue",
    "server_int8": "tab:orange",
    "naive_server": "tab:green",
    "pytriton": "tab:red",
    "offline_ort_fp32": "tab:blue",
    "offline_ort_int8": "tab:orange",
    "offline_torch_eager": "grey",
}


def markdown(results: dict) -> str:
    concurrencies = list(results["server_fp32"])
    lines = [
        f"Machine: {results['machine']}",
        "",
        "| system | " + " | ".join(f"c={c} samples/s (p50 / p99 ms)" for c in concurrencies) + " |",
        "|---|" + "---|" * len(concurrencies),
    ]
    for key, label in SERVERS.items():
        if key in results:
            cells = [f"{v['samples_per_s']} ({v['p50_ms']:.0f} / {v['p99_ms']:.0f})" for v in results[key].values()]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for key, label in OFFLINE.items():
        if key in results:
            r = results[key]
            lines.append(
                f"| {label} (batch {r['batch_size']}) | {r['samples_per_s']} |" + " |" * (len(concurrencies) - 1)
            )
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| `{k}` | {v} |" for k, v in results["ratios"].items()]
    if "budget_sweep" in results:
        lines += ["", "| max_batch_tokens | samples/s (c=16) | server peak RSS MiB |", "|---|---|---|"]
        lines += [f"| {b} | {p['samples_per_s']} | {p['peak_rss_mb']} |" for b, p in results["budget_sweep"].items()]
    sweeps = {"MiniLM fp32": results.get("length_sweep_fp32")}
    if "decoder" in results:
        sweeps["SmolLM2 fp32"] = results["decoder"]["length_sweep_fp32"]
    lines += [
        "",
        "| model | tokens per sample | samples/s | tokens/s (offline, ~1024-token batches) |",
        "|---|---|---|---|",
    ]
    for name, points in sweeps.items():
        lines += [f"| {name} | {n} | {p['samples_per_s']} | {p['tokens_per_s']} |" for n, p in (points or {}).items()]
    if "decoder" in results:
        d = results["decoder"]
        lines += ["", f"Decoder bundle {d['bundle']} ({d['mean_tokens']} tokens per sample on average):", ""]
        lines += ["| system | samples/s |", "|---|---|"]
        for key in ("offline_ort_fp32", "offline_ort_int8", "server_fp32", "server_int8"):
            if key in d:
                lines.append(f"| {key.replace('_', ' ')} | {d[key]['samples_per_s']} |")
    for name, reason in results.get("skipped", {}).items():
        lines.append(f"\nSkipped {name}: {reason}")
    return "\n".join(lines) + "\n"


def throughput_plot(results: dict, path: Path) -> Path:
    """Throughput against concurrency per server, with the offline limits as dashed lines."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label in SERVERS.items():
        if key in results:
            c = [int(k) for k in results[key]]
            ax.plot(c, [v["samples_per_s"] for v in results[key].values()], "o-", label=label, color=COLORS[key])
    for key, label in OFFLINE.items():
        if key in results:
            ax.axhline(results[key]["samples_per_s"], linestyle="--", linewidth=1, label=label, color=COLORS[key])
    ax.set(xscale="log", xlabel="concurrent clients", ylabel="samples/s", title="throughput vs concurrency")
    return _save(fig, ax, path)


def scaling_plot(results: dict, path: Path) -> Path:
    """Left: offline tokens/s against sequence length. Right: server samples/s and memory against budget."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    sweeps = {"MiniLM fp32": results.get("length_sweep_fp32", {})}
    if "decoder" in results:
        sweeps["SmolLM2 fp32"] = results["decoder"]["length_sweep_fp32"]
    for name, points in sweeps.items():
        left.plot([int(n) for n in points], [p["tokens_per_s"] for p in points.values()], "o-", label=name)
    left.set(xscale="log", xlabel="tokens per sample", ylabel="tokens/s (offline)", title="cost vs sequence length")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    budget = results.get("budget_sweep", {})
    budgets = [int(b) for b in budget]
    right.plot(budgets, [p["samples_per_s"] for p in budget.values()], "o-", color="tab:blue")
    right.set(xscale="log", xlabel="max_batch_tokens", title="rm-serve fp32 at c=16")
    right.set_ylabel("samples/s", color="tab:blue")
    memory = right.twinx()
    memory.plot(budgets, [p["peak_rss_mb"] for p in budget.values()], "s--", color="tab:purple")
    memory.set_ylabel("server peak RSS (MiB)", color="tab:purple")
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def latency_cdf_plot(latencies: dict[str, list[float]], path: Path) -> Path:
    """Distribution of request latencies (seconds in, milliseconds plotted) per server."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, values in latencies.items():
        ms = np.sort(np.array(values) * 1000)
        ax.plot(ms, np.arange(1, len(ms) + 1) / len(ms), label=label)
    ax.set(xlabel="request latency (ms)", ylabel="fraction of requests", title="latency CDF at the highest concurrency")
    return _save(fig, ax, path)


def bar_plot(series: dict[str, list[float]], groups: list[str], ylabel: str, path: Path) -> Path:
    """Grouped bars: one group per entry of `groups`, one bar per series (system) in each."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / max(1, len(series))
    for k, (name, values) in enumerate(series.items()):
        ax.bar(np.arange(len(groups)) + k * width, values, width, label=name)
    ax.set_xticks(np.arange(len(groups)) + width * (len(series) - 1) / 2, groups)
    ax.set(ylabel=ylabel)
    return _save(fig, ax, path)


def _save(fig, ax, path: Path) -> Path:
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
