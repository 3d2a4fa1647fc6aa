"""PNG plots of training curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_training_curves(loss_curve: list, eval_curve: list, path: Path) -> None:
    """Training loss per optimizer step, and held-out accuracy and loss at each evaluation."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    if loss_curve:
        steps, losses = zip(*loss_curve)
        left.plot(steps, losses, label="train loss", alpha=0.8)
    if eval_curve:
        steps, accuracy, eval_loss = zip(*eval_curve)
        left.plot(steps, eval_loss, "o-", label="eval loss")
        right.plot(steps, accuracy, "o-", color="tab:green")
    left.set(xlabel="optimizer step", ylabel="pairwise loss", title="loss")
    left.legend()
    right.set(xlabel="optimizer step", ylabel="pairwise accuracy", title="held-out accuracy", ylim=(0, 1))
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_step_curves(loss_curve: list, eval_curve: list[dict], path: Path) -> None:
    """A process reward model's training loss and held-out loss, and its held-out step accuracy,
    first-error accuracy and AUROC at each evaluation (`eval_curve`: one dict per evaluation)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    if loss_curve:
        steps, losses = zip(*loss_curve)
        left.plot(steps, losses, label="train loss", alpha=0.8)
    if eval_curve:
        steps = [point["step"] for point in eval_curve]
        left.plot(steps, [point["loss"] for point in eval_curve], "o-", label="eval loss")
        for name in ("step_accuracy", "first_error_accuracy", "step_auroc"):
            values = [point[name] if point[name] is not None else float("nan") for point in eval_curve]
            right.plot(steps, values, "o-", label=name.replace("_", " "))
        right.legend()
    left.set(xlabel="optimizer step", ylabel="step cross-entropy", title="loss")
    left.legend()
    right.set(xlabel="optimizer step", ylabel="held-out", title="held-out step metrics", ylim=(0, 1))
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
