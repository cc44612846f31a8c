"""What the router learned: `infmoe inspect`'s figures, index.html and summary.json.

Tokens of the validation split run through the model; a forward pre-hook on each routed FFN
layer keeps that layer's input x, and the layer's own routing methods (∞-MoE: `select`,
`union`, `sample_disagreement`; top-k MoE: `choose_experts`) say which blocks or experts
each token gets. The layers are not changed. From those masks and the router's Gaussian:

- usage: how many tokens choose each block or expert, its entropy against log(n), the
  share never chosen;
- the expert space: a 2-D PCA of μ(x) (top-k MoE: of the router logits), coloured by the
  token's kind and by how frequent it is, σ as the marker size;
- overlap: the Jaccard overlap of two tokens' masks for the same token id at two positions,
  for neighbouring positions and for random pairs, and of two samples of one token;
- σ: the per-token mean σ of each layer, and σ over training from the run's metrics.jsonl.

Every number a figure shows is in summary.json; docs/inspect.md explains each figure.
"""

from __future__ import annotations

import html
import json
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from infmoe.data import Tokenizer
from infmoe.errors import ConfigError
from infmoe.io import OutputError, atomic_paths, check_writable
from infmoe.layers import InfiniteMoE, TopKMoE, sampling
from infmoe.models import GPT
from infmoe.randomness import seeded

CLASSES = ("word", "number", "punctuation", "space/other")
BUCKETS = ("10 most frequent ids", "ids 11-100", "ids 101-1000", "rarer ids")
BUCKET_EDGES = (10, 100, 1000)  # frequency rank (0-based) below which a bucket ends
PAIR_KINDS = ("same token id", "neighbours", "random pairs", "two samples of a token")
PAIRS = 4096  # pairs of each kind drawn for the overlaps
SCATTER_POINTS = 3000  # tokens drawn in each expert-space panel (the PCA uses all)
QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)
SUMMARY_FILE = "summary.json"
WRITER = "infmoe inspect"  # summary.json's "written_by": marks a folder as an earlier inspect's output
_POPCOUNT = np.array([bin(v).count("1") for v in range(256)], dtype=np.int64)


@dataclass
class LayerRouting:
    """What one routed layer did with T tokens.

    masks (T, ceil(n_units / 8)) uint8: each token's blocks or experts (the union of its K
    samples), packed 8 to a byte (`pack`). counts (n_units,): tokens that chose each unit.
    space (T, d): μ(x) (∞-MoE) or the router logits (top-k MoE). sigma (T,): per-token mean
    σ over d_z; two_samples (T,): Jaccard overlap of two single-sample masks of the token;
    disagreement: `InfiniteMoE.sample_disagreement`, the number training logs (mean over
    batches). The last three are None for a top-k MoE.
    """

    name: str
    kind: str  # "infmoe" | "moe"
    n_units: int
    per_sample: int  # blocks one sample keeps, or top_k experts
    samples: int  # K masks in a token's union (1 in mean mode and for top-k)
    masks: np.ndarray
    counts: np.ndarray
    space: np.ndarray
    sigma: np.ndarray | None = None
    two_samples: np.ndarray | None = None
    disagreement: float | None = None

    @property
    def unit(self) -> str:
        return "block" if self.kind == "infmoe" else "expert"


def routed_layers(model: GPT, what: str = "the model") -> list[tuple[str, InfiniteMoE | TopKMoE]]:
    """(name, layer) of every ∞-MoE or top-k MoE FFN, named by its block; a `ConfigError`
    when there is none (a dense model)."""
    layers = [(f"block{i}", f) for i, f in enumerate(model.ffn_layers()) if isinstance(f, (InfiniteMoE, TopKMoE))]
    if not layers:
        raise ConfigError(f"{what} is a dense model (ffn={model.config.ffn!r}): there is no routing to inspect; "
                          "give an ∞-MoE or top-k MoE model")
    return layers


def pack(mask: torch.Tensor) -> np.ndarray:
    """(T, n) bool → (T, ceil(n / 8)) uint8, 8 mask entries to a byte."""
    return np.packbits(mask.cpu().numpy(), axis=-1)


def jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a ∩ b| / |a ∪ b| of packed masks (`pack`) a, b (P, bytes) → (P,); 1 where both are empty."""
    inter = _POPCOUNT[a & b].sum(-1)
    union = _POPCOUNT[a | b].sum(-1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def usage_entropy(counts: np.ndarray) -> tuple[float, float]:
    """(entropy, its maximum log n) in nats of the usage distribution counts / Σ counts."""
    p = counts / max(counts.sum(), 1)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum()), float(np.log(len(counts)))


def route(layer: InfiniteMoE | TopKMoE, x: torch.Tensor) -> dict[str, np.ndarray]:
    """x (T, d_model), the layer's input → its routing of those tokens, as numpy arrays."""
    if isinstance(layer, TopKMoE):
        choice = layer.choose_experts(x)
        mask = torch.zeros_like(choice.logits, dtype=torch.bool).scatter_(1, choice.expert, True)
        return {"masks": pack(mask), "counts": mask.sum(0).cpu().numpy(), "space": choice.logits.cpu().numpy()}
    chosen = layer.select(x)  # the layer's own K and mode
    mask = layer.union(chosen.index)
    with sampling(layer, mode="sample"):  # two single samples of each token, also in mean mode
        pair = layer.select(x, noise=torch.randn((2, x.shape[0], layer.d_z), device=x.device))
    first, second = (pack(layer.union(pair.index[i : i + 1])) for i in range(2))
    mu, sigma = layer.router_distribution(x)
    return {"masks": pack(mask), "counts": mask.sum(0).cpu().numpy(), "space": mu.cpu().numpy(),
            "sigma": sigma.mean(-1).cpu().numpy(), "two_samples": jaccard(first, second),
            "disagreement": layer.sample_disagreement(layer.route(x)).reshape(1).cpu().numpy()}  # C components too


@torch.no_grad()
def collect_routing(model: GPT, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], *,
                    seed: int = 1234) -> list[LayerRouting]:
    """Run `batches` (inputs (b, T) int64) through `model`, which stays as it is, and record
    each routed layer's routing of every token (in the batches' order), under a fixed seed."""
    layers = routed_layers(model)
    inputs: dict[str, torch.Tensor] = {}
    hooks = [layer.register_forward_pre_hook(lambda _, args, name=name: inputs.__setitem__(name, args[0]))
             for name, layer in layers]
    parts: dict[str, list[dict[str, np.ndarray]]] = {name: [] for name, _ in layers}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with seeded(seed, device):
            for x, _ in batches:
                model(x.to(device))
                for name, layer in layers:
                    parts[name].append(route(layer, inputs[name].reshape(-1, layer.d_model)))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    records = []
    for name, layer in layers:
        got = {key: [part[key] for part in parts[name]] for key in parts[name][0]}
        joined = {key: np.concatenate(values) for key, values in got.items() if key not in ("counts", "disagreement")}
        moe = isinstance(layer, TopKMoE)
        records.append(LayerRouting(
            name, "moe" if moe else "infmoe", layer.n_experts if moe else layer.n_blocks,
            layer.top_k if moe else layer.n_kept, 1 if moe or layer.mode == "mean" else layer.n_samples,
            joined["masks"], np.sum(got["counts"], axis=0), joined["space"], joined.get("sigma"),
            joined.get("two_samples"), None if moe else float(np.mean(got["disagreement"]))))
    return records


def token_class(text: str) -> str:
    """The kind of a decoded token: "word", "number", "punctuation" or "space/other"
    (whitespace, partial UTF-8 bytes, mixtures)."""
    s = text.strip()
    if not s or "\ufffd" in s:
        return "space/other"
    if any(c.isalpha() for c in s) and all(c.isalpha() or c in "'’-" for c in s):
        return "word"
    if any(c.isdigit() for c in s) and all(c.isdigit() or c in ".,_" for c in s):
        return "number"
    if all(unicodedata.category(c)[0] in "PS" for c in s):
        return "punctuation"
    return "space/other"


def token_properties(ids: np.ndarray, tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Per token: its class (index into `CLASSES`, from the decoded text of its id) and its
    frequency bucket (index into `BUCKETS`, from its id's rank by count among `ids`)."""
    unique, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    kind = np.array([CLASSES.index(token_class(tokenizer.decode([int(i)]))) for i in unique])
    rank = np.empty(len(unique), dtype=np.int64)
    rank[np.argsort(-counts, kind="stable")] = np.arange(len(unique))
    return kind[inverse], np.searchsorted(BUCKET_EDGES, rank[inverse], side="right")


def pairs(ids: np.ndarray, seq_len: int, n: int, rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Up to n position pairs (i, j), i != j, of each kind: the same token id, neighbours
    in one window of seq_len, and random; `ids` holds consecutive windows."""
    t = len(ids)
    ahead = np.flatnonzero(np.arange(t - 1) % seq_len != seq_len - 1)  # i with i + 1 in its window
    near = rng.choice(ahead, size=min(n, len(ahead)), replace=False) if len(ahead) else ahead
    first = rng.integers(0, t, n) if t > 1 else np.zeros(0, dtype=np.int64)
    second = rng.integers(0, t - 1, len(first))
    second += second >= first
    order = np.argsort(ids, kind="stable")  # positions grouped by id
    counts = np.bincount(ids)
    start = np.cumsum(counts) - counts
    place = np.empty(t, dtype=np.int64)
    place[order] = np.arange(t)
    repeated = np.flatnonzero(counts[ids] >= 2)
    same = rng.choice(repeated, size=n) if len(repeated) else repeated
    other = rng.integers(0, counts[ids[same]] - 1) if len(same) else same
    other += other >= place[same] - start[ids[same]]  # another occurrence of the same id
    return {"same token id": (same, order[start[ids[same]] + other]), "neighbours": (near, near + 1),
            "random pairs": (first, second)}


def overlaps(record: LayerRouting, pair_index: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """Jaccard overlap of each pair of `pairs`, and (∞-MoE) of two samples of each token."""
    out = {kind: jaccard(record.masks[i], record.masks[j]) for kind, (i, j) in pair_index.items()}
    if record.two_samples is not None:
        out["two samples of a token"] = record.two_samples
    return out


def pca_2d(x: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """x (T, d) → its projection (T, 2) on the two leading principal components (signs fixed
    so each component's largest loading is positive; zeros where d < 2) and their shares of
    the variance."""
    x = torch.from_numpy(np.asarray(x, dtype=np.float64))
    centred = x - x.mean(0)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    vh = vh[:2] * torch.sign(vh[:2].gather(1, vh[:2].abs().argmax(1, keepdim=True)))
    coords = torch.zeros(len(x), 2, dtype=x.dtype)
    coords[:, : len(vh)] = centred @ vh.T
    variance = s.square()
    ratio = (variance[:2] / variance.sum().clamp_min(1e-300)).tolist()
    return coords.numpy(), ratio + [0.0] * (2 - len(ratio))


def _quantiles(values: np.ndarray) -> dict[str, float]:
    return {f"q{round(100 * q):02d}": float(np.quantile(values, q)) for q in QUANTILES}


def layer_summary(record: LayerRouting, overlap: dict[str, np.ndarray], variance: list[float]) -> dict:
    """Every number the figures show about one layer (summary.json's ``layers`` entries)."""
    tokens = len(record.masks)
    entropy, max_entropy = usage_entropy(record.counts)
    out = {"kind": record.kind, "unit": record.unit, "n_units": record.n_units, "per_sample": record.per_sample,
           "samples": record.samples, "usage_counts": record.counts.tolist(),
           "usage_share_sorted": (np.sort(record.counts)[::-1] / tokens).tolist(),
           "mean_share": float(record.counts.sum() / (tokens * record.n_units)),
           "never_chosen_share": float((record.counts == 0).mean()),
           "usage_entropy": entropy, "max_entropy": max_entropy, "usage_entropy_ratio": entropy / max_entropy
           if max_entropy > 0 else 1.0,
           "overlap": {kind: {"mean": float(v.mean()), "median": float(np.median(v)), "pairs": len(v)}
                       for kind, v in overlap.items() if len(v)},
           "pca_explained_variance_ratio": variance}
    if record.sigma is not None:
        out |= {"sample_overlap": float(record.two_samples.mean()),
                "sample_disagreement_as_logged": record.disagreement,
                "sigma_mean": float(record.sigma.mean()), "sigma_quantiles": _quantiles(record.sigma)}
    return out


# --- figures ---------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def _panels(n: int, width: float = 4.2, height: float = 3.4, cols: int = 4):
    """A figure with n axes in rows of at most `cols`; the unused axes hidden."""
    plt = _pyplot()
    cols = min(cols, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows + 0.6), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _save(fig, path: Path) -> None:
    if not fig.get_layout_engine():
        fig.tight_layout()
    try:
        fig.savefig(path, dpi=110, format="png")
    finally:
        _pyplot().close(fig)


def plot_usage(records: Sequence[LayerRouting], layers: Sequence[dict], path: Path) -> None:
    fig, axes = _panels(len(records))
    for ax, record, stats in zip(axes, records, layers):
        share = np.asarray(stats["usage_share_sorted"])
        rank = np.arange(1, len(share) + 1)
        if len(share) <= 64:
            ax.bar(rank, share, width=0.85, color="tab:blue", label="share of tokens choosing it")
        else:
            ax.fill_between(rank, share, step="mid", color="tab:blue", alpha=0.7, label="share of tokens choosing it")
        ax.axhline(stats["mean_share"], color="tab:red", ls="--", lw=1, label=f"uniform use: {stats['mean_share']:.2f}")
        ax.set_title(f"{record.name}: entropy {stats['usage_entropy']:.2f} of {stats['max_entropy']:.2f} nats\n"
                     f"never chosen: {stats['never_chosen_share']:.1%} of {record.n_units} {record.unit}s",
                     fontsize=9)
        ax.set_xlabel(f"{record.unit}, most chosen first")
        ax.set_ylabel("share of tokens")
        ax.set_ylim(0, min(1.0, share.max() * 1.25 + 0.02))
        ax.legend(fontsize=7, loc="upper right")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Usage: how often each " + "/".join(sorted({r.unit for r in records})) + " is chosen")
    _save(fig, path)


def plot_space(records: Sequence[LayerRouting], coords: Sequence[np.ndarray], layers: Sequence[dict],
               colour: np.ndarray, names: Sequence[str], legend_title: str, path: Path, seed: int) -> None:
    plt = _pyplot()
    palette = plt.get_cmap("tab10")
    fig, axes = _panels(len(records), width=4.4, height=4.0)
    shown = np.random.default_rng(seed).permutation(len(colour))[:SCATTER_POINTS]
    for ax, record, xy, stats in zip(axes, records, coords, layers):
        if record.sigma is not None:
            low, high = np.quantile(record.sigma, [0.02, 0.98])
            size = 3 + 40 * np.clip((record.sigma - low) / max(high - low, 1e-12), 0, 1)
        else:
            size = np.full(len(colour), 6.0)
        for c in range(len(names)):
            pick = shown[colour[shown] == c]
            ax.scatter(xy[pick, 0], xy[pick, 1], s=size[pick], color=palette(c), alpha=0.5, linewidths=0)
        pc1, pc2 = stats["pca_explained_variance_ratio"]
        what = "μ(x)" if record.kind == "infmoe" else "router logits"
        ax.set_title(f"{record.name}: PCA of {what}", fontsize=9)
        ax.set_xlabel(f"PC1 ({pc1:.0%} of variance)")
        ax.set_ylabel(f"PC2 ({pc2:.0%} of variance)")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], marker="o", ls="", color=palette(c), label=f"{name} ({_share(colour == c)})")
               for c, name in enumerate(names)]
    fig.legend(handles=handles, title=f"{legend_title} (share of the tokens)", loc="lower center",
               ncol=len(names), fontsize=8, title_fontsize=8, frameon=False)
    sized = any(r.sigma is not None for r in records)
    fig.suptitle(f"Expert space: each token's {'μ(x)' if sized else 'router logits'}, coloured by "
                 f"{legend_title.lower()}" + ("; larger markers: larger mean σ (scaled per layer)" if sized else ""))
    fig.tight_layout(rect=(0, 0.6 / fig.get_figheight(), 1, 1))  # room for the legend: 0.6 inch
    _save(fig, path)


def _share(mask: np.ndarray) -> str:
    share = mask.mean()
    return f"{share:.1%}" if 0 < share < 0.01 else f"{share:.0%}"


def plot_overlap(records: Sequence[LayerRouting], overlap: Sequence[dict[str, np.ndarray]], path: Path) -> None:
    plt = _pyplot()
    from matplotlib.patches import Patch

    colours = dict(zip(PAIR_KINDS, ("tab:green", "tab:orange", "tab:gray", "tab:purple")))
    width = len(PAIR_KINDS) + 1
    fig, ax = plt.subplots(figsize=(max(8.0, 1.9 * len(records) + 4.5), 4.6))
    for n, (record, by_kind) in enumerate(zip(records, overlap)):
        kinds = [k for k in PAIR_KINDS if len(by_kind.get(k, []))]
        positions = [n * width + PAIR_KINDS.index(k) for k in kinds]
        if not kinds:  # too few tokens for any pair
            continue
        boxes = ax.boxplot([by_kind[k] for k in kinds], positions=positions, widths=0.75, patch_artist=True,
                           showfliers=False, showmeans=True, medianprops=dict(color="black"),
                           meanprops=dict(marker="D", markerfacecolor="white", markeredgecolor="black", markersize=4))
        for box, kind in zip(boxes["boxes"], kinds):
            box.set_facecolor(colours[kind])
        u = record.counts.sum() / (len(record.masks) * record.n_units)  # mean mask size, as a share
        ax.hlines(u / (2 - u), n * width - 0.5, n * width + len(PAIR_KINDS) - 0.5, colors="black", linestyles=":")
    ax.set_xticks([n * width + (len(PAIR_KINDS) - 1) / 2 for n in range(len(records))],
                  [r.name for r in records])
    ax.set_xlabel("layer")
    ax.set_ylabel("Jaccard overlap |A ∩ B| / |A ∪ B|")
    ax.set_ylim(0, 1.05)
    handles = [Patch(color=colours[k], label=k) for k in PAIR_KINDS
               if any(len(o.get(k, [])) for o in overlap)]
    handles += [plt.Line2D([], [], color="black", ls=":", label="independent masks of that size"),
                plt.Line2D([], [], marker="D", ls="", markerfacecolor="white", markeredgecolor="black", label="mean")]
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    sampled = any(r.two_samples is not None for r in records)
    fig.suptitle("Overlap of routing masks: pairs of tokens" + (", and two samples of one token" if sampled else ""))
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


def plot_sigma(records: Sequence[LayerRouting], curve: dict[str, list[float]], path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2 if curve else 1, figsize=(11 if curve else 6, 4.2), squeeze=False)
    ax = axes[0, 0]
    sigmas = [r for r in records if r.sigma is not None]
    bins = np.histogram_bin_edges(np.concatenate([r.sigma for r in sigmas]), bins=50)
    for r in sigmas:
        ax.hist(r.sigma, bins=bins, histtype="step", lw=1.5, label=f"{r.name} (median {np.median(r.sigma):.3f})")
    ax.set_xlabel("σ of a token (mean over the d_z dimensions)")
    ax.set_ylabel("tokens")
    ax.set_title("σ per layer over the inspected tokens")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if curve:
        ax = axes[0, 1]
        ax.plot(curve["step"], curve["sigma_mean"], color="tab:blue", label="mean σ (all layers)")
        ax.set_xlabel("training step")
        ax.set_ylabel("mean σ", color="tab:blue")
        lines = ax.get_lines()
        if "sigma_over_mu" in curve:
            twin = ax.twinx()
            twin.plot(curve["step"], curve["sigma_over_mu"], color="tab:orange", label="σ / RMS(μ)")
            twin.set_ylabel("σ / RMS(μ)", color="tab:orange")
            lines += twin.get_lines()
        ax.legend(lines, [line.get_label() for line in lines], fontsize=8)
        ax.set_title("σ over training (the run's metrics.jsonl)")
        ax.grid(alpha=0.3)
    _save(fig, path)


# --- the report ------------------------------------------------------------------------------


@dataclass
class Figure:
    file: str
    caption: str
    draw: Callable[[Path], None]


def inspect_model(model: GPT, tokenizer: Tokenizer, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                  out_dir: str | Path, *, seed: int = 1234, curve: dict[str, list[float]] | None = None,
                  title: str = "model") -> dict:
    """Route `batches` through `model` and write the figures, index.html and summary.json
    into `out_dir` (all or none of them: temporaries renamed together). Returns the summary."""
    records = collect_routing(model, batches, seed=seed)
    ids = torch.cat([x.reshape(-1) for x, _ in batches]).numpy()
    seq_len = batches[0][0].shape[1]
    kind, bucket = token_properties(ids, tokenizer)
    rng = np.random.default_rng(seed)
    pair_index = pairs(ids, seq_len, PAIRS, rng)
    overlap = [overlaps(r, pair_index) for r in records]
    projections = [pca_2d(r.space) for r in records]
    layers = [layer_summary(r, o, v) for r, o, (_, v) in zip(records, overlap, projections)]
    coords = [xy for xy, _ in projections]
    sampled = any(r.sigma is not None for r in records)
    curve = curve if sampled and curve else {}
    summary = {"written_by": WRITER, "model": title, "tokens": len(ids), "seq_len": seq_len, "seed": seed,
               "token_classes": {c: int((kind == i).sum()) for i, c in enumerate(CLASSES)},
               "frequency_buckets": {b: int((bucket == i).sum()) for i, b in enumerate(BUCKETS)},
               "layers": dict(zip((r.name for r in records), layers)), "sigma_over_training": curve}
    units = "/".join(sorted({r.unit for r in records}))
    figures = [
        Figure("usage.png", f"How often each {units} is chosen, most chosen first, per layer; the title gives the "
               "usage entropy against its maximum log n and the share never chosen.",
               lambda p: plot_usage(records, layers, p)),
        Figure("expert-space-class.png", "The tokens' routing (μ(x), or a top-k MoE's router logits) projected on "
               "its two principal components, coloured by the kind of token; larger markers have larger σ.",
               lambda p: plot_space(records, coords, layers, kind, CLASSES, "Token kind", p, seed)),
        Figure("expert-space-frequency.png", "The same projection coloured by how frequent the token's id is "
               "among the inspected tokens.",
               lambda p: plot_space(records, coords, layers, bucket, BUCKETS, "Frequency", p, seed)),
        Figure("overlap.png", "Jaccard overlap of two routing masks: the same token id at two positions, "
               "neighbouring positions, random pairs and (∞-MoE) two samples of one token; the dotted line is "
               "what independent masks of that size would give.", lambda p: plot_overlap(records, overlap, p)),
    ]
    if sampled:
        figures.append(Figure("sigma.png", "The distribution of each token's mean σ per layer"
                              + (", and σ over training from the run's metrics.jsonl." if curve else "."),
                              lambda p: plot_sigma(records, curve, p)))
    out_dir = Path(out_dir)
    names = [f.file for f in figures] + ["index.html", SUMMARY_FILE]
    with atomic_paths(*(out_dir / name for name in names)) as temporaries:
        for figure, tmp in zip(figures, temporaries):
            figure.draw(tmp)
        temporaries[-2].write_text(index_html(title, len(ids), figures), encoding="utf-8")
        temporaries[-1].write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return summary


def check_output_dir(out_dir: str | Path) -> Path:
    """`out_dir`, created if needed and proven writable, when inspect may write there: a new
    or empty folder, or an earlier inspect's output (its summary.json says so; hidden
    temporaries of a killed write do not count). Any other folder would lose its own
    index.html or summary.json: a one-line `OutputError`, before any compute, as export does."""
    out_dir = Path(out_dir)
    if out_dir.is_dir() and not is_inspect_output(out_dir):
        if any(not _is_temporary(entry.name) for entry in out_dir.iterdir()):
            raise OutputError(f"{out_dir} is not empty and not the output of an earlier infmoe inspect, "
                              "so it was left untouched: choose a new or empty folder")
    return check_writable(out_dir)


def _is_temporary(name: str) -> bool:
    """Whether `name` is of `atomic_path`'s temporaries (``.<name>.<random>.tmp``)."""
    return name.startswith(".") and name.endswith(".tmp")


def is_inspect_output(folder: Path) -> bool:
    """Whether `folder` holds a summary.json that `inspect_model` wrote."""
    try:
        summary = json.loads((folder / SUMMARY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, unreadable, not UTF-8 or not JSON: not ours
        return False
    return isinstance(summary, dict) and summary.get("written_by") == WRITER


def index_html(title: str, tokens: int, figures: Sequence[Figure]) -> str:
    """A page showing each figure with its caption, and a link to summary.json."""
    body = "\n".join(f'<figure><img src="{f.file}" alt="{f.file}"><figcaption>{html.escape(f.caption)}'
                     "</figcaption></figure>" for f in figures)
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>infmoe inspect: {html.escape(title)}"
            "</title>\n<style>body{font-family:sans-serif;max-width:1800px;margin:2em auto;padding:0 1em}"
            "img{max-width:100%}figure{margin:2em 0}figcaption{color:#333}</style></head><body>\n"
            f"<h1>infmoe inspect: {html.escape(title)}</h1>\n<p>{tokens:,} validation tokens. Every number shown is "
            f"in <a href=\"summary.json\">summary.json</a>; docs/inspect.md explains each figure.</p>\n"
            f"{body}\n</body></html>\n")
