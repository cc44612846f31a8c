"""Figures of an evaluation: the K sweep's loss against ms/token."""

from __future__ import annotations

from collections.abc import Sequence

from infmoe.evaluation.perplexity import SweepRow


def plot_sweep(rows: Sequence[SweepRow], path, title: str = "") -> None:
    """Validation loss against ms/token, one labelled point per setting, saved as PNG to
    `path` (a temporary of `infmoe.io.atomic_path`: this writes in place)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    sampled = [r for r in rows if r.mode == "sample"]
    ax.plot([r.ms_per_token for r in sampled], [r.loss for r in sampled], "-o", color="tab:blue", label="K samples")
    for r in rows:
        if r.mode == "mean":
            ax.plot(r.ms_per_token, r.loss, "s", color="tab:orange", label="mean mode (z = μ)")
        if r.mode == "adaptive":
            ax.plot(r.ms_per_token, r.loss, "D", color="tab:green",
                    label=f"adaptive K (mean {r.mean_samples:.2f})")
        ax.annotate(r.label, (r.ms_per_token, r.loss), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("ms per token (forward, this machine)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.ticklabel_format(axis="y", useOffset=False)  # losses as they are, not as offsets from one
    ax.set_title(title or "∞-MoE: samples K at inference")
    ax.margins(0.15)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120, format="png")
    finally:
        plt.close(fig)
