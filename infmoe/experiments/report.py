"""Tables and plots from an experiment's result JSONs, written into a markdown file.

The spec's ``report`` list names the sections::

    report:
      - {id: A, title: "...", runs: [infmoe, dense-active, dense-total]}
      - {id: B, kind: zeroshot, runs: [infmoe, moe, switch]}
      - {id: C, kind: sweep, runs: [infmoe]}
      - {id: D, kind: curves, runs: [moe-e8, moe-e32, infmoe]}

Kinds: ``table`` (default: parameters, tokens, validation loss and perplexity as mean ±
std over seeds, loss spikes), ``zeroshot`` (accuracy per task with standard errors and a
significance test against the first run), ``zeroshot-sweep`` (the zero-shot accuracy of
each run at each K of the spec's ``zeroshot_samples``, and the largest K's gain over the
smallest with a paired test over items), ``sweep`` (K at inference: loss, accuracy,
ms/token, the union of blocks a token computed and its mean K, plus a plot), ``curves`` (the table plus a plot of the training-loss curves), ``compare``
(the first run's validation loss against each other run's: the difference, Welch's t,
and whether it is lower than the other in every pair of seeds), ``cost`` (how many seed
runs finished and the time their training steps took, summed), ``eval`` (the table of one
JSON that `infmoe eval --out` wrote, named by ``file`` instead of ``runs``: e.g. a sweep
timed alone on an idle machine). Each section
replaces the text between ``<!-- generated:ID -->`` and ``<!-- end:ID -->`` in the
markdown file (appended when the markers are missing), so hand-written prose around the
tables survives a regeneration and no number in them is typed by hand.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from infmoe.errors import ConfigError
from infmoe.evaluation.cells import mean_k_cell
from infmoe.experiments.results import read_result
from infmoe.experiments.spec import REPORT_KINDS
from infmoe.experiments.stats import (difference_z, mean_std, paired_z, pooled_estimate, spikes, training_minutes,
                                      welch_t)
from infmoe.io import atomic_path, write_text
from infmoe.markdown import markdown_row, markdown_table, number_cell


def load_results(results_dir: Path) -> dict[str, list[dict]]:
    """run name → its result records (one per finished seed), seeds in order."""
    by_run: dict[str, list[dict]] = defaultdict(list)
    for path in sorted(results_dir.glob("*.json")):
        record = read_result(path)
        by_run[record["run"]].append(record)
    return {run: sorted(records, key=lambda r: r["seed"]) for run, records in by_run.items()}


def _pm(values: list[float], spec: str = ".3f") -> str:
    mean, std = mean_std(values)
    return f"{mean:{spec}} ± {std:{spec.lstrip('+')}}" if len(values) > 1 else f"{mean:{spec}}"


def _m(x: float) -> str:
    return f"{x / 1e6:.2f}M"


def _no_runs(run: str, columns: int) -> str:
    """The row of a run without finished seeds: a note across a table of `columns` columns."""
    return f"| {run} | (no finished runs) |" + " |" * (columns - 2)


def _with_z(value: float, z: float) -> str:
    """A difference and its z, flagged where |z| > 1.96 (two-sided 5%)."""
    return f"{value:+.3f} ({z:+.1f}{', significant' if abs(z) > 1.96 else ''})"


def table_section(runs: list[str], results: dict[str, list[dict]]) -> str:
    """Per run, mean ± std over seeds. Final σ, σ / rms μ and sample disagreement (two
    samples of a token: the share of one's blocks the other does not keep): the router's,
    at the last log line (∞-MoE only; "-" for runs logged before the statistic existed);
    K=16 − K=1: validation loss with 16 samples minus with 1."""
    header = ["run", "params total", "active", "tokens", "seeds", "val loss", "val perplexity", "loss spikes",
              "final σ", "σ / rms μ", "sample disagreement", "K=16 − K=1", "train min"]
    lines = markdown_table(header, [])
    for run in runs:
        records = results.get(run, [])
        if not records:
            lines.append(_no_runs(run, len(header)))
            continue
        first = records[0]
        losses = [r["headline"]["loss"] for r in records]
        lines.append(markdown_row([
            run, _m(first["params"]["total"]), _m(first["params"]["active"]), f"{first['tokens_seen'] / 1e6:.2f}M",
            str(len(records)), _pm(losses), _pm([math.exp(v) for v in losses], ".1f"),
            _pm([spikes(r["curve"]["train_loss"]) for r in records], ".1f"), _final(records, "sigma_mean"),
            _final(records, "sigma_over_mu"), _final(records, "sample_disagreement"), _k_gap(records),
            _pm([training_minutes(r) for r in records], ".1f")]))
    base = next((r for run in runs for r in results.get(run, [])), None)
    if base is not None:
        for name in ("unigram", "bigram"):
            loss = base["baselines"][name]
            lines.append(markdown_row([f"{name} baseline", "", "", "", "", f"{loss:.3f}", f"{math.exp(loss):.1f}",
                                       *[""] * 6]))
    return "\n".join(lines)


def _final(records: list[dict], series: str) -> str:
    values = [r["curve"][series][-1] for r in records if r["curve"].get(series)]
    return _pm(values) if values else "-"


def _k_gap(records: list[dict]) -> str:
    gaps = []
    for r in records:
        by_label = {x["label"]: x["loss"] for x in r["sweep"]}
        if "K=16" in by_label and "K=1" in by_label:
            gaps.append(by_label["K=16"] - by_label["K=1"])
    return _pm(gaps, "+.4f") if gaps else "-"


def compare_section(runs: list[str], results: dict[str, list[dict]]) -> str:
    """The first run against each other run by validation loss: mean difference (other −
    first; positive means the first is better), Welch's t over seeds, and whether every seed
    of the first beats every seed of the other."""
    header = [f"{runs[0]} vs", "seeds", f"{runs[0]} val loss", "their val loss", "difference (theirs − ours)",
              "perplexity ratio", "Welch t", "lower in every seed pair"]
    lines = markdown_table(header, [])
    ours = [r["headline"]["loss"] for r in results.get(runs[0], [])]
    for run in runs[1:]:
        theirs = [r["headline"]["loss"] for r in results.get(run, [])]
        if not ours or not theirs:
            lines.append(_no_runs(run, len(header)))
            continue
        difference = mean_std(theirs)[0] - mean_std(ours)[0]
        lines.append(markdown_row([run, f"{len(ours)} vs {len(theirs)}", _pm(ours), _pm(theirs), f"{difference:+.3f}",
                                   f"{math.exp(difference):.3f}", number_cell(welch_t(ours, theirs), "+.1f"),
                                   "yes" if max(ours) < min(theirs) else "no"]))
    return "\n".join(lines)


def cost_section(runs: list[str], results: dict[str, list[dict]]) -> str:
    """One row: the finished seed runs of `runs`, their training-step time summed over runs
    (each on its own thread), the longest of them, and the tokens each trained on."""
    records = [r for run in runs for r in results.get(run, [])]
    if not records:
        return "(no finished runs)"
    minutes = [training_minutes(r) for r in records]
    tokens = sorted({r["tokens_seen"] for r in records})
    return "\n".join(markdown_table(
        ["seed runs finished", "training time, summed over runs", "longest run", "tokens per run"],
        [[str(len(records)), f"{sum(minutes) / 60:.1f} h", f"{max(minutes):.1f} min",
          ", ".join(f"{t / 1e6:.2f}M" for t in tokens)]]))


def zeroshot_section(runs: list[str], results: dict[str, list[dict]]) -> str:
    """Accuracy per task, mean over seeds with the mean of the per-seed standard errors;
    each run after the first is compared with the first by z = Δ / sqrt(se1² + se2²)."""
    tasks = sorted({t for run in runs for r in results.get(run, []) for t in r.get("zeroshot", {})})
    if not tasks:
        return "(no zero-shot results)"
    lines = markdown_table(["task", *runs, *(f"{r} − {runs[0]} (z)" for r in runs[1:])], [])
    for task in tasks:
        stats = {}
        for run in runs:
            records = [r["zeroshot"][task] for r in results.get(run, []) if task in r.get("zeroshot", {})]
            if records:
                acc, se = pooled_estimate([r["acc"] for r in records], [r["acc_stderr"] for r in records])
                stats[run] = (acc, se, records[0]["n"])
        cells = [f"{stats[r][0]:.3f} ± {stats[r][1]:.3f}" if r in stats else "-" for r in runs]
        for run in runs[1:]:
            if run in stats and runs[0] in stats:
                delta = stats[run][0] - stats[runs[0]][0]
                cells.append(_with_z(delta, difference_z(delta, stats[run][1], stats[runs[0]][1])))
            else:
                cells.append("-")
        n = next(iter(stats.values()))[2] if stats else 0
        lines.append(markdown_row([f"{task} (n={n})", *cells]))
    return "\n".join(lines)


def zeroshot_sweep_section(runs: list[str], results: dict[str, list[dict]]) -> str:
    """Per run and task, accuracy at each K (mean over seeds ± the mean of their standard
    errors), and the largest K minus the smallest: the mean over items and seeds of the
    per-item difference in correctness, with z = mean / its standard error (the same items
    are scored at each K, so the test is paired and far tighter than comparing two means)."""
    lines = []
    for run in runs:
        records = [r for r in results.get(run, []) if r.get("zeroshot_sweep")]
        if not records:
            continue
        ks = sorted({int(k) for r in records for k in r["zeroshot_sweep"]})
        if not lines:
            lines = markdown_table(["run", "task", *(f"K={k}" for k in ks), f"K={ks[-1]} − K={ks[0]} (paired z)"], [])
        tasks = sorted(set.intersection(*(set(r["zeroshot_sweep"][str(ks[0])]) for r in records)))
        all_differences = []
        for task in tasks:
            cells = []
            for k in ks:
                per_seed = [r["zeroshot_sweep"][str(k)][task] for r in records]
                acc, se = pooled_estimate([x["acc"] for x in per_seed], [x["acc_stderr"] for x in per_seed])
                cells.append(f"{acc:.3f} ± {se:.3f}")
            differences = [hi - lo for r in records for hi, lo in zip(r["zeroshot_sweep"][str(ks[-1])][task]["correct"],
                                                                   r["zeroshot_sweep"][str(ks[0])][task]["correct"])]
            all_differences += differences
            n = records[0]["zeroshot_sweep"][str(ks[0])][task]["n"]
            lines.append(markdown_row([run, f"{task} (n={n})", *cells, _paired(differences)]))
        lines.append(markdown_row([run, "all tasks, items pooled", *[""] * len(ks), _paired(all_differences)]))
    return "\n".join(lines) if lines else "(no zero-shot results per K)"


def eval_section(path: Path) -> str:
    """The rows of one `infmoe eval` JSON as a table, with where and how it ran."""
    try:
        report = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"report section eval: cannot read {path} ({err}); run infmoe eval --out to write it") from None
    lines = [f"`infmoe eval {report['checkpoint']}` on {report['data']} ({report['tokens']:,} validation tokens, "
             f"{report['device']}, {report['precision']}, {report['threads']} threads)", ""]
    base = next((r["ms_per_token"] for r in report["rows"] if r["label"] == "K=1"), None)
    rows = []
    for r in report["rows"]:
        mean_k = mean_k_cell(r["mode"], r["n_samples"],
                             None if r.get("mean_samples") is None else f"{r['mean_samples']:.2f}")
        ratio = f"{r['ms_per_token'] / base:.2f}" if base else "-"
        rows.append([r["label"], f"{r['loss']:.4f}", f"{r['accuracy']:.4f}", f"{r['ms_per_token']:.4f}", ratio,
                     number_cell(r.get("union_fraction"), ".3f"), mean_k])
    lines += markdown_table(["setting", "val loss", "next-token accuracy", "ms/token", "ms/token vs K=1",
                             "union of blocks", "mean K"], rows)
    return "\n".join(lines)


def _paired(differences: list[int]) -> str:
    """Mean of per-item differences in correctness (−1, 0, 1) and its z."""
    return _with_z(*paired_z(differences))


def sweep_section(runs: list[str], results: dict[str, list[dict]], figure: Path, link: str) -> str:
    """Loss, next-token accuracy, ms/token, the union of blocks a token computed and the
    mean K it averaged for each inference setting, mean over seeds; one plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = markdown_table(["run", "setting", "val loss", "val perplexity", "next-token accuracy", "ms/token",
                            "union of blocks", "mean K"], [])
    fig, ax = plt.subplots(figsize=(6, 4))
    for run in runs:
        records = results.get(run, [])
        if not records:
            continue
        # the settings every seed has (a setting added to the spec later may be missing from old results)
        labels = [row["label"] for row in records[0]["sweep"]
                  if all(any(x["label"] == row["label"] for x in r["sweep"]) for r in records)]
        points = []
        for label in labels:
            rows = [next(x for x in r["sweep"] if x["label"] == label) for r in records]
            losses, ms = [x["loss"] for x in rows], [x["ms_per_token"] for x in rows]
            accuracy = _pm([x["accuracy"] for x in rows]) if all("accuracy" in x for x in rows) else "-"
            union = (_pm([x["union_fraction"] for x in rows])
                     if all(x.get("union_fraction") is not None for x in rows) else "-")
            mean_k = mean_k_cell(rows[0]["mode"], rows[0]["n_samples"],
                                 None if rows[0].get("mean_samples") is None
                                 else _pm([x["mean_samples"] for x in rows], ".2f"))
            lines.append(markdown_row([run, label, _pm(losses), _pm([math.exp(v) for v in losses], ".1f"), accuracy,
                                       _pm(ms, ".3f"), union, mean_k]))
            points.append((label, sum(ms) / len(ms), sum(losses) / len(losses)))
        sampled = [p for p in points if p[0].startswith("K=")]
        line, = ax.plot([p[1] for p in sampled], [p[2] for p in sampled], "-o", label=f"{run}: K samples")
        for label, x, y in points:
            if label == "mean":
                ax.plot(x, y, "s", color=line.get_color(), mfc="white", label=f"{run}: mean mode")
            elif label.startswith("auto"):
                ax.plot(x, y, "D", color=line.get_color(), ms=8, label=f"{run}: adaptive K")
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("ms per token (forward, 1 thread)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.ticklabel_format(axis="y", useOffset=False)  # losses as they are, not as offsets from one
    ax.set_title("∞-MoE: samples K at inference")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, figure)
    return "\n".join(lines) + f"\n\n![K at inference]({link})"


def curves_figure(runs: list[str], results: dict[str, list[dict]], figure: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for run in runs:
        for i, record in enumerate(results.get(run, [])):
            curve = record["curve"]
            ax.plot(curve["step"], curve["train_loss"], lw=0.8, alpha=0.8, color=f"C{runs.index(run)}",
                    label=run if i == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_ylim(top=min(8.5, ax.get_ylim()[1]))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, figure)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def build_sections(report: list[dict[str, Any]], results: dict[str, list[dict]], markdown: Path) -> dict[str, str]:
    sections = {}
    for section in report:
        ident, kind, runs = section.get("id"), section.get("kind", "table"), section.get("runs", [])
        if kind == "eval":
            if not ident or not section.get("file"):
                raise ConfigError(f"report section {section!r} needs an id and a file (an infmoe eval JSON)")
            sections[ident] = eval_section(Path(section["file"]))
            continue
        if not ident or not runs:
            raise ConfigError(f"report section {section!r} needs an id and runs")
        figure = markdown.parent / f"results-{ident}.png"
        link = figure.name
        if kind == "table":
            sections[ident] = table_section(runs, results)
        elif kind == "curves":
            curves_figure(runs, results, figure)
            sections[ident] = table_section(runs, results) + f"\n\n![training loss]({link})"
        elif kind == "zeroshot":
            sections[ident] = table_section(runs, results) + "\n\n" + zeroshot_section(runs, results)
        elif kind == "zeroshot-sweep":
            sections[ident] = zeroshot_sweep_section(runs, results)
        elif kind == "sweep":
            sections[ident] = sweep_section(runs, results, figure, link)
        elif kind == "compare":
            sections[ident] = compare_section(runs, results)
        elif kind == "cost":
            sections[ident] = cost_section(runs, results)
        else:
            raise ConfigError(f"report section {ident}: kind={kind!r} is invalid: choose one of "
                              + ", ".join(REPORT_KINDS))
    return sections


def update_markdown(path: Path, sections: dict[str, str]) -> None:
    """Put each section between its markers in `path` (appending missing ones)."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    for ident, body in sections.items():
        block = f"<!-- generated:{ident} -->\n{body}\n<!-- end:{ident} -->"
        pattern = re.compile(rf"<!-- generated:{re.escape(ident)} -->.*?<!-- end:{re.escape(ident)} -->", re.S)
        text = pattern.sub(lambda _: block, text) if pattern.search(text) else text + f"\n{block}\n"
    write_text(path, text)
