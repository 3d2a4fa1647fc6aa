"""Markdown table and PNG plots of a serving benchmark run (bench/results/latest.json)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

SERVERS = {"server_fp32": "rm-serve fp32", "server_int8": "rm-serve int8", "naive_server": "naive HTTP server"}
OFFLINE = {
    "offline_ort_fp32": "offline ONNX Runtime fp32",
    "offline_ort_int8": "offline ONNX Runtime int8",
    "offline_torch_eager": "offline PyTorch eager",
}
COLORS = {
    "server_fp32": "tab:blue",
    "server_int8": "tab:orange",
    "naive_server": "tab:green",
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


def latency_cdf_plot(latencies: dict[str, list[float]], path: Path) -> Path:
    """Distribution of request latencies (seconds in, milliseconds plotted) per server."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, values in latencies.items():
        ms = np.sort(np.array(values) * 1000)
        ax.plot(ms, np.arange(1, len(ms) + 1) / len(ms), label=label)
    ax.set(xlabel="request latency (ms)", ylabel="fraction of requests", title="latency CDF at the highest concurrency")
    return _save(fig, ax, path)


def _save(fig, ax, path: Path) -> Path:
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
