"""The loss-curve plot written into each checkpoint folder as loss.png.

Left: training loss per step (faint) and smoothed, and the validation loss at each validation.
Right: validation bits per byte (text) or recall accuracy (MQAR). matplotlib is optional: it is
imported only here, only when a plot is drawn, and a missing one just means no plot.
"""

from __future__ import annotations

from pathlib import Path


def plot_history(state: dict, path: Path, title: str) -> bool:
    """Draw loss.png: training loss (raw and smoothed) and validation loss per step, with bits per
    byte (text) or recall accuracy (MQAR) beside it. False if matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    hist, evals = state["history"], state["evals"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    if hist["step"]:
        ax.plot(hist["step"], hist["loss"], color="tab:blue", alpha=0.25, lw=0.8)
        smooth, ema = [], None
        for v in hist["loss"]:
            ema = v if ema is None else 0.95 * ema + 0.05 * v
            smooth.append(ema)
        ax.plot(hist["step"], smooth, color="tab:blue", label="train (smoothed)")
    if evals:
        ax.plot(
            [e["step"] for e in evals],
            [e["val_loss"] for e in evals],
            "o-",
            color="tab:orange",
            label="validation",
        )
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    if evals and "bits_per_byte" in evals[0]:
        key, label = "bits_per_byte", "validation bits/byte"
    else:
        key, label = "accuracy", "validation recall accuracy"

    if evals:
        ax2.plot([e["step"] for e in evals], [e[key] for e in evals], "o-", color="tab:green")
    ax2.set(xlabel="step", ylabel=label, title=label)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
