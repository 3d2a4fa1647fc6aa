"""PNG curves of a PPO run from its metrics.jsonl rows."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS = [
    ("score", "reward-service score"),
    ("kl", "KL to reference (per sequence)"),
    ("non_score_reward", "non-score reward (-beta KL)"),
    ("entropy", "entropy (per token)"),
    ("value_loss", "value loss"),
    ("response_length", "response length (tokens)"),
]
TIMES = ["generate", "ref_and_value", "reward_wait", "train"]


def plot_curves(rows: list[dict], path: Path) -> Path:
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    for ax, (key, title) in zip(axes.flat, PANELS):
        ax.plot(steps, [r[key] for r in rows], "o-", markersize=3)
        ax.set(title=title, xlabel="step")
        ax.grid(alpha=0.3)
    clip = axes.flat[len(PANELS)]
    for key in ("policy_clip_fraction", "value_clip_fraction", "approx_kl"):
        clip.plot(steps, [r[key] for r in rows], label=key)
    clip.set(title="clipping and approx KL", xlabel="step")
    clip.legend(fontsize=7)
    timing = axes.flat[len(PANELS) + 1]
    bottom = [0.0] * len(rows)
    for key in TIMES:
        values = [r[f"time/{key}"] for r in rows]
        timing.bar(steps, values, bottom=bottom, label=key)
        bottom = [b + v for b, v in zip(bottom, values)]
    timing.set(title="time per step (s)", xlabel="step")
    timing.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
