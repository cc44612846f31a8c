"""The `infmoe` command: one entry point, one subcommand per task.

Bad input (any `InfmoeError`, or an argparse mistake) prints one line and exits with 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import sys
from pathlib import Path
from collections.abc import Callable, Collection, Sequence
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

import torch

from infmoe.checkpoint import save_checkpoint
from infmoe.evaluation.tasks import TASKS
from infmoe.data import prepare, unigram_loss
from infmoe.deprecation import one_line_warnings
from infmoe.errors import ConfigError, InfmoeError, choose, invalid, positive_int, seed_int
from infmoe.evaluation import evaluate_model, mean_k_cell, perplexity, plot_sweep, validation_batches
from infmoe.generation import check_sampling_args, generate
from infmoe.device import PRECISIONS, autocast_for, pick_device, uses_bf16
from infmoe.io import atomic_paths, check_writable_file, write_text
from infmoe.loading import LoadedModel, load_model, model_path
from infmoe.layers import sampling
from infmoe.layers.infinite_moe import sample_count
from infmoe.models import config_names, get_config
from infmoe.randomness import seeded
from infmoe.params import parameter_report
from infmoe.training import TrainConfig, resolve, train

TASK_NAMES = list(TASKS)
MODEL_BATCH = {"tiny": (16, 256), "gpt2-small": (1, 1024)}  # sequences x tokens per training step
# Decoding feeds one token per step: a second CPU thread saves under 10% on an idle machine
# and doubles the time or worse when another process holds a core (docs/speed.md).
GENERATE_THREADS = 1
BOOLEAN_SETTINGS = {f.name for f in dataclasses.fields(TrainConfig) if isinstance(f.default, bool)}
TEXT_SETTINGS = TrainConfig.text_fields()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parse_overrides(tokens: Sequence[str], flags: Collection[str] = (), text: Collection[str] = ()) -> dict[str, Any]:
    """``--key value`` or ``--key=value`` pairs → {key: value}, values typed as YAML
    scalars (``--d_z 32`` gives 32, ``--capacity_factor null`` gives None). Keys in
    `flags` may stand alone and then mean true (``--resume``); values of keys in `text`
    stay as written (``--out_dir 2024`` is a folder name, not a number)."""
    out: dict[str, Any] = {}
    tokens = list(tokens)
    while tokens:
        token = tokens.pop(0)
        if not token.startswith("--") or len(token) == 2:
            raise ConfigError(f"unexpected argument {token!r}: options look like --key value")
        key, eq, value = token[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            if key in flags and (not tokens or tokens[0].startswith("--")):
                value = "true"
            elif not tokens or tokens[0].startswith("--"):
                raise ConfigError(f"option --{key} has no value: write --{key} VALUE")
            else:
                value = tokens.pop(0)
        out[key] = value if key in text else _scalar(key, value)
    return out


_DECIMAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _scalar(key: str, text: str) -> Any:
    try:
        value = yaml.safe_load(text)  # safe_load: a tag such as !!python/object constructs nothing
    except Exception as err:  # noqa: BLE001 - YAMLError, or what a tag's constructor raises (!!int abc)
        reason = getattr(err, "problem", None) or err  # a YAMLError's own words, without its position
        raise ConfigError(f"--{key} {text!r} is not a value YAML can read ({reason}): give a number, true, "
                          "false, null or text, and quote text that YAML reads otherwise, "
                          f"e.g. --{key} {shlex.quote(json.dumps(text))}") from None
    # YAML 1.1 reads 1e-3 as a string; turn such numbers into floats, but not words that
    # float() also takes ("nan", "inf"), which are names far more often than numbers.
    if isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
        return float(value)
    return value


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def cmd_params(args: argparse.Namespace, overrides: dict[str, Any]) -> None:
    samples = _int_list("--samples", args.samples)
    reports = [parameter_report(get_config(c, **overrides), c, samples) for c in args.configs or config_names()]
    if args.json:
        print(json.dumps([r.__dict__ for r in reports], indent=2))
        return
    table = Table(title="parameters and forward FLOPs per token (≤: upper bound on the union of K masks)")
    for column in ["config", "ffn", "total"] + [f"active K={k}" for k in samples] + [f"FLOPs K={k}" for k in samples]:
        table.add_column(column, justify="left" if column in ("config", "ffn") else "right")
    for r in reports:
        mark = {k: "" if r.exact[k] else "≤" for k in samples}
        table.add_row(r.name, r.ffn, _si(r.total), *(mark[k] + _si(r.active[k]) for k in samples),
                      *(mark[k] + _si(r.flops[k]) for k in samples))
    _console().print(table)


def cmd_prepare(args: argparse.Namespace, overrides: dict[str, Any]) -> None:
    data = prepare(args.data, cache_dir=args.cache_dir, tokenizer=args.tokenizer, vocab_size=args.tokenizer_vocab,
                   encoding_errors=args.encoding_errors, progress=not args.quiet)
    table = Table(title=f"prepared {args.data}" + (" (cached)" if data.cached else ""), show_header=False)
    for key, value in [("folder", str(data.directory)), ("tokenizer", data.tokenizer.name),
                       ("vocabulary", f"{data.vocab_size:,}"), ("train tokens", f"{len(data.train):,}"),
                       ("valid tokens", f"{len(data.valid):,}"),
                       ("unigram loss (valid)", f"{unigram_loss(data.train, data.valid, data.vocab_size):.4f}")]:
        table.add_row(key, value)
    _console().print(table)


def cmd_train(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    cfg, model_config = resolve(overrides)
    result = train(cfg, model_config)
    if result.rank != 0:
        return 0
    if result.interrupted_by:
        print(f"stopped by {result.interrupted_by} at step {result.step}; checkpoint saved to {result.checkpoint}; "
              f"continue with: infmoe train --out_dir {cfg.out_dir} --resume ...", file=sys.stderr)
        return 130 if result.interrupted_by == "SIGINT" else 143
    if result.step == result.start:
        print(f"nothing to train: the checkpoint in {cfg.out_dir} is already at step {result.step}, where this "
              "run ends; raise --max_steps (or --stop_at) to train longer", file=sys.stderr)
    elif result.val_loss is not None:
        print(f"final validation loss {result.val_loss:.4f} (perplexity {perplexity(result.val_loss):.2f}); "
              f"unigram baseline {result.unigram_loss:.4f}; checkpoint {result.checkpoint}")
    return 0


def cmd_eval(args: argparse.Namespace, overrides: dict[str, Any]) -> None:
    samples, adaptive = _samples_list("--samples", args.samples)
    positive_int("--tokens", args.tokens)
    seed_int("--seed", args.seed)
    if adaptive:
        sample_count("--max_samples", args.max_samples)
    json_path, png_path = eval_output_paths(args.out, args.model)
    for path in (json_path, png_path):
        check_writable_file(path)  # before the compute, not after
    loaded = load_for_inference(args.model, args.device)
    _check_batch_and_seq_len(args, loaded)
    source = data_source(args.data, loaded)
    device = next(loaded.model.parameters()).device
    result = evaluate_model(loaded.model, loaded.tokenizer, source, samples=samples, modes=args.mode,
                            adaptive=args.max_samples if adaptive else None,
                            max_tokens=args.tokens, batch_size=args.batch_size, seq_len=args.seq_len,
                            cache_dir=args.cache_dir, encoding_errors=args.encoding_errors, seed=args.seed,
                            autocast=autocast_for(args.precision, device), progress=True)
    table = Table(title=f"{args.model} on {source} (validation, {result.tokens:,} tokens)")
    for column in ("setting", "loss", "perplexity", "next-token accuracy", "ms/token", "union of blocks",
                   "mean K"):
        table.add_column(column, justify="right")
    for r in result.rows:
        union = "-" if r.union_fraction is None else f"{r.union_fraction:.3f}"
        mean_k = mean_k_cell(r.mode, r.n_samples, None if r.mean_samples is None else f"{r.mean_samples:.2f}")
        table.add_row(r.label, f"{r.loss:.4f}", f"{r.perplexity:.2f}", f"{r.accuracy:.4f}", f"{r.ms_per_token:.4f}",
                      union, mean_k)
    _console().print(table)
    report = {"checkpoint": str(args.model), "data": source, "tokens": result.tokens, "device": str(device),
              "precision": "bf16" if uses_bf16(args.precision, device) else "fp32",
              "threads": torch.get_num_threads(), "rows": [r.to_dict() for r in result.rows]}
    with atomic_paths(json_path, png_path) as (json_tmp, png_tmp):
        json_tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        plot_sweep(result.rows, png_tmp, title=f"{Path(args.model).name}: K at inference")
    print(f"wrote {json_path} and {png_path}")


def eval_output_paths(out: str | None, model: str) -> tuple[Path, Path]:
    """eval's (JSON, PNG) paths. --out PREFIX: PREFIX.json and PREFIX.png, whatever dots PREFIX
    holds (evals/lr0.003 must not lose ".003" and overwrite evals/lr0.001's files); a PREFIX
    that ends in .json or .png names the pair by its stem; a folder gets eval.json and
    eval.png inside. Without --out: inside an exported folder, beside a checkpoint file."""
    if out is None:
        path = model_path(model)
        prefix = (path if path.is_dir() else path.parent) / "eval"
    elif Path(out).is_dir() or out.endswith(("/", os.sep)):
        prefix = Path(out) / "eval"
    else:
        prefix = Path(out)
        prefix = prefix.with_suffix("") if prefix.suffix in (".json", ".png") else prefix
    return prefix.with_name(prefix.name + ".json"), prefix.with_name(prefix.name + ".png")


def _check_batch_and_seq_len(args: argparse.Namespace, loaded: LoadedModel) -> None:
    """--batch_size and --seq_len of eval and inspect, against the model, before any compute."""
    positive_int("--batch_size", args.batch_size)
    n_ctx = loaded.model.config.n_ctx
    if args.seq_len is not None and (isinstance(args.seq_len, bool) or not 1 <= args.seq_len <= n_ctx):
        raise invalid("--seq_len", args.seq_len,
                      f"must be an integer in [1, {n_ctx}], the n_ctx of {loaded.path}")


def cmd_inspect(args: argparse.Namespace, overrides: dict[str, Any]) -> None:
    from infmoe.evaluation.routing_report import check_output_dir, inspect_model, routed_layers
    from infmoe.training.metrics import METRICS_FILE, sigma_curve

    positive_int("--tokens", args.tokens)
    seed_int("--seed", args.seed)
    out = check_output_dir(args.out)  # before the compute, not after
    curve = sigma_curve(args.run) if args.run else None
    if args.run and not curve:
        print(f"infmoe inspect: note: {Path(args.run) / METRICS_FILE} logs no σ yet (no training step, "
              "or no ∞-MoE layer): the figures leave out σ over training", file=sys.stderr)
    loaded = load_for_inference(args.model, args.device)
    _check_batch_and_seq_len(args, loaded)
    layers = routed_layers(loaded.model, args.model)
    source = data_source(args.data, loaded)
    _, batches = validation_batches(loaded.model, loaded.tokenizer, source, max_tokens=args.tokens,
                                    batch_size=args.batch_size, seq_len=args.seq_len, cache_dir=args.cache_dir,
                                    encoding_errors=args.encoding_errors)
    summary = inspect_model(loaded.model, loaded.tokenizer, batches, out, seed=args.seed, curve=curve,
                            title=Path(args.model).name)
    table = Table(title=f"routing of {args.model} on {source} (validation, {summary['tokens']:,} tokens)")
    for column in ("layer", "units", "never chosen", "usage entropy", "same id", "neighbours", "random",
                   "two samples", "median σ"):
        table.add_column(column, justify="right")
    for name, _ in layers:
        stats = summary["layers"][name]
        overlap = [stats["overlap"].get(k, {}).get("mean") for k in ("same token id", "neighbours", "random pairs",
                                                                     "two samples of a token")]
        sigma = stats.get("sigma_quantiles", {}).get("q50")
        table.add_row(name, f"{stats['n_units']} {stats['unit']}s", f"{stats['never_chosen_share']:.1%}",
                      f"{stats['usage_entropy']:.2f} / {stats['max_entropy']:.2f}",
                      *("-" if v is None else f"{v:.3f}" for v in overlap + [sigma]))
    _console().print(table)
    print(f"wrote {out / 'index.html'}, {out / 'summary.json'} and the figures beside them")


def cmd_generate(args: argparse.Namespace, overrides: dict[str, Any]) -> None:
    check_sampling_args(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    if args.seed is not None:
        seed_int("--seed", args.seed)
    _check_utf8("--prompt", args.prompt)
    torch.set_num_threads(positive_int("--threads", args.threads))
    n_samples, mode = _one_sample_setting(args)
    loaded = load_for_inference(args.model, args.device)
    model, tokenizer = loaded.model, loaded.tokenizer
    prompt = tokenizer.encode(args.prompt)
    ids: list[int] = []
    shown = ""
    sys.stdout.write(args.prompt)
    with sampling(model, n_samples=n_samples, mode=mode):  # None keeps the trained K or mode
        tokens = generate(model, prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_token=tokenizer.eot_id)
        for token in tokens:
            if token == tokenizer.eot_id:
                break
            ids.append(token)
            text = tokenizer.decode(ids)
            if not text.endswith("\ufffd"):  # hold back a character whose bytes are still incomplete
                sys.stdout.write(text[len(shown):])
                sys.stdout.flush()
                shown = text
    sys.stdout.write(tokenizer.decode(ids)[len(shown):] + "\n")


def _check_utf8(flag: str, text: str) -> None:
    """Refuse text whose bytes were not UTF-8 (Linux hands such argv bytes over as lone
    surrogates, U+DC80-U+DCFF, which no tokenizer encodes), rather than replace them: the
    model would then continue a prompt other than the one given."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ConfigError(f"{flag} is not UTF-8 text (character {err.start} is an undecodable byte): "
                          "give it in UTF-8, e.g. from a terminal set to UTF-8 (LANG=C.UTF-8)") from None


def cmd_bench(args: argparse.Namespace, overrides: dict[str, Any]) -> None:
    from infmoe import bench

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.render:
        result, tables = bench.render(args.render)
        print(tables, end="")
        bench.save(result, None, args.markdown)
        return
    positive_int("--repeats", args.repeats)
    if args.tokens is not None:
        positive_int("--tokens", args.tokens)
    for path in (args.json, args.markdown):
        if path:
            check_writable_file(path)  # before minutes of timing, not after
    device = pick_device(args.device)
    if args.grid:
        print(bench.sparse_grid(bench.SHAPES["quick" if args.quick else "gpt2-small"], args.repeats,
                                precision=args.precision), end="")
        return
    if args.quick:  # one-token decoding and a few generated tokens: seconds, for CI
        shapes, models, repeats = ["quick"], [("tiny", 2, 64)], min(args.repeats, 3)
        decode_tokens, new_tokens = (1,), 8
    else:
        shapes, repeats = args.shapes.split(","), args.repeats
        models = [(m, *MODEL_BATCH[m]) for m in args.models.split(",") if m]
        decode_tokens, new_tokens = bench.DECODE_TOKENS, None
    for name in shapes:
        choose("--shapes", name, bench.SHAPES)
    for name, *_ in models:
        choose("--models", name, MODEL_BATCH)
    result = bench.run(shapes, repeats=repeats, memory=not args.no_memory, models=models, device=device,
                       peak=not args.quick, precision=args.precision, decode_tokens=decode_tokens,
                       new_tokens=new_tokens, compile=args.compile, tokens=args.tokens)
    print(bench.markdown(result), end="")
    bench.save(result, args.json, args.markdown)


def cmd_experiment(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    from infmoe.experiments import (build_sections, check_results, load_results, load_spec, refresh_curves, run_grid,
                                    update_markdown)

    spec = load_spec(args.spec)
    check_results(spec.results_dir)  # a file there that is not ours would break the report after the grid
    if args.report:
        check_writable_file(args.report)  # before the grid, not after hours of it
    failed: dict[str, str] = {}
    if not args.report_only:
        try:
            failed = run_grid(spec, jobs=args.jobs, only=args.only.split(",") if args.only else None,
                              reevaluate=args.reevaluate).failed
        except KeyboardInterrupt as stop:  # run_grid has said how to continue
            return 143 if str(stop) == "SIGTERM" else 130
    else:
        refresh_curves(spec)  # where the runs' logs are here; a no-op on a clone without them
    if args.report:
        results = load_results(spec.results_dir)
        update_markdown(Path(args.report), build_sections(spec.report, results, Path(args.report)))
        print(f"wrote the report sections into {args.report}")
    if failed:  # last, and a non-zero status, so that a script driving the grid can tell
        print(f"infmoe experiment: {len(failed)} job(s) failed; fix the cause and run the same command to retry "
              "them:", file=sys.stderr)
        for name, summary in failed.items():
            print(f"  {name}: {summary}", file=sys.stderr)
        return 1
    return 0


def cmd_export(args: argparse.Namespace, overrides: dict[str, Any]) -> None:
    from infmoe.hf import export_hf

    out = export_hf(args.model, args.hf)
    print(f"wrote a Hugging Face folder to {out}: AutoModelForCausalLM.from_pretrained({str(out)!r}, "
          "trust_remote_code=True)")


def cmd_upcycle(args: argparse.Namespace, overrides: dict[str, Any]) -> None:
    from infmoe.hf import upcycle_to_infmoe

    seed_int("--seed", args.seed)
    loaded = load_for_inference(args.model, "cpu")
    model, tokenizer = loaded.model, loaded.tokenizer
    with seeded(args.seed):
        upcycled = upcycle_to_infmoe(model, **{"d_z": 48, **overrides})
    save_checkpoint(args.out, upcycled, tokenizer_files=tokenizer.files(),
                    state={"upcycled_from": str(args.model)})
    print(f"wrote {args.out}: ∞-MoE with H = {upcycled.config.ffn_hidden}; continue training with "
          f"infmoe train --init_from {args.out} --data ...")


def cmd_zeroshot(args: argparse.Namespace, overrides: dict[str, Any]) -> None:
    from infmoe.evaluation.tasks import load_task
    from infmoe.evaluation.zeroshot import evaluate_task

    seed_int("--seed", args.seed)
    if args.out:
        check_writable_file(args.out)  # before the compute, not after
    n_samples, mode = _one_sample_setting(args)
    loaded = load_for_inference(args.model, args.device)
    model, tokenizer = loaded.model, loaded.tokenizer
    requests = load_task(args.task, args.data, limit=args.limit)
    result = evaluate_task(model, tokenizer, requests, batch_size=args.batch_size, n_samples=n_samples,
                           mode=mode, seed=args.seed, progress=True, skip_too_long=args.skip_too_long)
    skipped = f" ({result['skipped']} too long for the context left out)" if result["skipped"] else ""
    table = Table(title=f"{args.task}: {result['n']} items from {args.data}{skipped}")
    for column in ("metric", "value", "stderr"):
        table.add_column(column, justify="right")
    for metric in ("acc", "acc_norm"):
        if metric in result:
            table.add_row(metric, f"{result[metric]:.4f}", f"{result[metric + '_stderr']:.4f}")
    _console().print(table)
    if args.out:
        summary = {k: v for k, v in result.items() if k != "predictions"}
        write_text(args.out, json.dumps({"model": str(args.model), "task": args.task, "data": str(args.data),
                                         **summary}, indent=2) + "\n")


def load_for_inference(path: str, device: str) -> LoadedModel:
    """Any MODEL that `infmoe.loading` reads, its model in eval mode on `device`."""
    device = pick_device(device)  # a bad --device fails before the weights are read
    loaded = load_model(path)
    loaded.model.to(device)
    return loaded


def data_source(data: str | None, loaded: LoadedModel) -> str:
    """--data, or else the corpus the checkpoint names; a `ConfigError` where there is neither."""
    if data is None and loaded.data_source is None:
        raise ConfigError(f"{loaded.path} does not name its training data: pass --data SOURCE")
    return data or loaded.data_source


def _console() -> Console:
    return Console(width=None if sys.stdout.isatty() else 200)


def _samples_list(flag: str, text: str) -> tuple[list[int], bool]:
    """--samples of eval: the values of K, and whether "auto" (adaptive K) is among them."""
    values = [v for v in text.split(",") if v.strip() != "auto"]
    return (_int_list(flag, ",".join(values)) if values else []), len(values) < len(text.split(","))


def _one_sample_setting(args: argparse.Namespace) -> tuple[int | None, str | None]:
    """--samples K|auto and --mode of generate and zeroshot → (n_samples, mode) for the
    ∞-MoE layers; None keeps what the model was trained with."""
    if args.samples is None:
        return None, args.mode
    if args.samples == "auto":
        if args.mode not in (None, "adaptive"):
            raise ConfigError(f"--samples auto chooses K per token, which --mode {args.mode} does not; drop --mode")
        return sample_count("--max_samples", args.max_samples), "adaptive"
    values = _int_list("--samples", args.samples)
    if len(values) != 1:
        raise ConfigError(f"--samples {args.samples!r}: give one K (e.g. 4) or auto")
    return values[0], args.mode


def _int_list(flag: str, text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(f"{flag} {text!r} is not a comma-separated list of integers, e.g. 1,2,4") from None
    for value in values:
        sample_count(flag, value)
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="infmoe", description="∞-MoE: mixture of experts with a continuous expert index.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name: str, handler: Callable[..., Any], *, parents: Sequence[argparse.ArgumentParser] = (),
                overrides: bool = False, **kwargs: Any) -> argparse.ArgumentParser:
        """A subcommand whose flags are its parents' and its own; overrides: whether it takes
        trailing --key value pairs (config overrides) besides them."""
        p = sub.add_parser(name, parents=list(parents), **kwargs)
        p.set_defaults(handler=handler, overrides=overrides)
        return p

    p = command("params", cmd_params, overrides=True,
                help="total/active parameters and FLOPs per token of named configs",
                description="Print total and active parameters and forward FLOPs per token. "
                            "Trailing --key value pairs override config fields for every config.")
    p.add_argument("configs", nargs="*", help=f"config names or .json/.yaml files (default: all of {', '.join(config_names())})")
    p.add_argument("--samples", default="1,2,4", help="routing samples K to report, e.g. 1,2,4")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = command("prepare", cmd_prepare, parents=[data_flags(default="embedded")],
                help="tokenize a corpus into the cache (train does this itself)",
                description="Tokenize a corpus to memory-mapped token files, reusing the cache when it "
                            "exists.")
    p.add_argument("--tokenizer", default="auto", choices=("auto", "gpt2", "bpe"))
    p.add_argument("--tokenizer_vocab", "--tokenizer-vocab", type=int, default=4096, help="size of a trained BPE")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    command("train", cmd_train, overrides=True,
            help="train a model (default: tiny-infmoe on the embedded corpus)",
            formatter_class=argparse.RawDescriptionHelpFormatter,
            description="Train a model. Every setting is a --key value pair: the training settings "
                        "below, or any model config field or FFN option (e.g. --n_layer 6 --d_z 32).",
            epilog="training settings (default):\n" + "\n".join(
                f"  --{f.name:<18} {f.default!r}" for f in dataclasses.fields(TrainConfig)))

    p = command("eval", cmd_eval, help="validation loss, perplexity and ms/token for each K",
                description="Evaluate a checkpoint on a validation split for each number of samples K "
                            "(and mean mode), timing each in the same run; writes JSON and a PNG plot.",
                parents=[model_flag(), data_flags(), sampling_flags(sweep=True),
                         tokens_flag(131072, "evaluate"), batch_flags(8), seed_flag(),
                         device_flags(precision=True)])
    p.add_argument("--out", default=None, help="output prefix: writes PREFIX.json and PREFIX.png (a folder: eval.json "
                   "and eval.png in it; default: in an exported folder, or beside the checkpoint file)")

    p = command("inspect", cmd_inspect,
                help="figures of what the router learned: usage, expert space, overlap, σ",
                description="Route validation tokens through an ∞-MoE or top-k MoE model and write PNG "
                            "figures (usage per block or expert, a PCA of the expert space, mask overlaps, "
                            "σ), an index.html showing them and a summary.json of every number they show "
                            "(docs/inspect.md).",
                parents=[model_flag(), data_flags(), tokens_flag(16384, "route"), batch_flags(8), seed_flag(),
                         device_flags()])
    p.add_argument("--out", required=True, metavar="DIR",
                   help="folder for the figures, index.html and summary.json: new, empty, or an earlier inspect's")
    p.add_argument("--run", default=None, metavar="RUN_DIR",
                   help="the run's --out_dir: also plot σ over training from its metrics.jsonl")

    p = command("generate", cmd_generate, help="generate text from a checkpoint (KV cache, streamed)",
                description="Generate text after a prompt, streaming it to the terminal.",
                parents=[model_flag(), sampling_flags(sweep=False), seed_flag(None), device_flags()])
    p.add_argument("--prompt", required=True)
    p.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top_k", "--top-k", type=int, default=None)
    p.add_argument("--top_p", "--top-p", type=float, default=None)
    p.add_argument("--threads", type=int, default=GENERATE_THREADS,
                   help=f"CPU threads (default {GENERATE_THREADS}; see docs/speed.md)")

    p = command("zeroshot", cmd_zeroshot,
                help="zero-shot multiple-choice accuracy (HellaSwag, PIQA, ARC, ...)",
                description="Score each choice by its log-likelihood, as lm-evaluation-harness does; "
                            "report acc (and acc_norm, length-normalised) with standard errors.",
                parents=[model_flag(), sampling_flags(sweep=False), batch_flags(16, seq_len=False),
                         seed_flag(), device_flags()])
    p.add_argument("--task", required=True, help="one of " + ", ".join(TASK_NAMES))
    p.add_argument("--data", required=True, help="the task's jsonl file in its original record layout")
    p.add_argument("--limit", type=int, default=None, help="only the first N items")
    p.add_argument("--skip-too-long", "--skip_too_long", action="store_true",
                   help="leave out items whose continuation exceeds the model's context (else: an error)")
    p.add_argument("--out", default=None, help="also write the result as JSON here")

    p = command("bench", cmd_bench, help="time the FFN variants and whole models, as ratios in one process",
                description="Training (fwd+bwd time, memory, GFLOP/s) and decoding (no grad, "
                            "weights read from memory) of dense, top-k MoE, ∞-MoE and HF Mixtral "
                            "layers as ratios to dense MLPs of the active and the full width; "
                            "whole-model training and generation tokens/s; the speed targets, met or not.",
                parents=[device_flags(precision=True)])
    p.add_argument("--quick", action="store_true", help="small shapes and few repeats (seconds; CI)")
    p.add_argument("--shapes", default="tiny,gpt2-small", help="layer shapes: tiny, gpt2-small")
    p.add_argument("--models", default="tiny,gpt2-small",
                   help="model sizes for training and generation tokens/s ('' for none)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-memory", "--no_memory", action="store_true", help="skip the memory columns")
    p.add_argument("--compile", action="store_true", help="also compiled layers and models (torch.compile)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per training call in the layer tables "
                   "(default: each shape's own; a GPU wants >= 16384 to be GEMM-bound)")
    p.add_argument("--grid", action="store_true", help="sparse / full fwd+bwd time over B and K instead")
    p.add_argument("--render", default=None, metavar="JSON", help="re-render the tables of a saved --json result")
    p.add_argument("--json", default=None, help="write the results as JSON here")
    p.add_argument("--markdown", default=None, help="write the tables as markdown here")

    p = command("experiment", cmd_experiment,
                help="run a grid of (config x seed) from a YAML spec, resumably, and report",
                description="Train and evaluate every run of the spec (finished runs are skipped, "
                            "interrupted ones resume), then write the report's tables and plots.")
    p.add_argument("spec", help="experiment spec (YAML); see infmoe/experiments/spec.py")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, >= 1 (give each one thread in the spec)")
    p.add_argument("--report", default=None, help="markdown file to write the report sections into")
    p.add_argument("--report-only", "--report_only", action="store_true", help="only regenerate the report")
    p.add_argument("--only", default=None, metavar="RUN,...",
                   help="run only these runs ('infmoe') or jobs ('infmoe-seed1'), e.g. to spend a short "
                        "budget on the main comparisons first")
    p.add_argument("--reevaluate", action="store_true",
                   help="evaluate the finished runs named by --only again from their checkpoints (after the "
                        "spec's eval settings changed) and rewrite their result JSONs")

    p = command("export", cmd_export, parents=[model_flag()],
                help="write a checkpoint in Hugging Face format (config.json + safetensors)",
                description="Write config.json, model.safetensors, the tokenizer and the modeling code, "
                            "loadable with AutoModelForCausalLM.from_pretrained(DIR, "
                            "trust_remote_code=True).")
    p.add_argument("--hf", required=True, metavar="DIR", help="output folder (new, empty, or an earlier export)")

    p = command("upcycle", cmd_upcycle, overrides=True,
                parents=[model_flag(), seed_flag(0, "seed for the fresh weights")],
                help="turn a dense model into an ∞-MoE starting point",
                description="Build an ∞-MoE model with H = 2 x the dense width whose first half of each "
                            "FFN is the dense FFN; trailing --key value pairs set ∞-MoE options "
                            "(default --d_z 48).")
    p.add_argument("--out", required=True, help="the checkpoint file to write")
    return parser


# Flags that several subcommands take, each declared once, in a function that returns a
# parent parser (`argparse`'s parents=). A fresh parent for every subcommand: argparse hands
# the children the parent's own action objects, so one child's set_defaults would change them
# for all. Where the defaults differ per subcommand, they are the function's arguments.


def _parent() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(add_help=False)


def model_flag() -> argparse.ArgumentParser:
    """MODEL: what `load_for_inference` reads."""
    p = _parent()
    p.add_argument("model", metavar="MODEL",
                   help="an infmoe checkpoint file, an exported folder, or a Hugging Face GPT-2 folder")
    return p


def data_flags(default: str | None = None) -> argparse.ArgumentParser:
    """--data and how its text is read; default None: the model's training corpus."""
    p = _parent()
    p.add_argument("--data", default=default,
                   help="a text file, a folder, a Hugging Face dataset name, or 'embedded' (default: "
                        + (default or "the checkpoint's training corpus") + ")")
    p.add_argument("--cache_dir", "--cache-dir", default=None, help="prepared-data cache folder")
    p.add_argument("--encoding_errors", "--encoding-errors", default="strict", choices=("strict", "replace"),
                   help="non-UTF-8 bytes: fail (strict) or become U+FFFD (replace)")
    return p


def sampling_flags(sweep: bool) -> argparse.ArgumentParser:
    """--samples, --max_samples, --mode of the ∞-MoE layers. sweep (eval): a list of K and
    both modes, each evaluated in turn; else one setting, by default the trained one."""
    p = _parent()
    if sweep:
        p.add_argument("--samples", default="1,2,4,8",
                       help="values of K, e.g. 1,2,4,8; 'auto' adds adaptive K (each token its own, up to "
                            "--max_samples)")
    else:
        p.add_argument("--samples", default=None,
                       help="∞-MoE samples K, or auto: each token its own K up to --max_samples "
                            "(default: as trained)")
    p.add_argument("--max_samples", "--max-samples", type=int, default=16,
                   help="the largest K of --samples auto")
    p.add_argument("--mode", default="both" if sweep else None,
                   choices=("sample", "mean", "both") if sweep else ("sample", "mean"))
    return p


def tokens_flag(default: int, verb: str) -> argparse.ArgumentParser:
    """--tokens: how much of the validation split a command reads."""
    p = _parent()
    p.add_argument("--tokens", type=int, default=default,
                   help=f"validation tokens to {verb} (from the start)")
    return p


def batch_flags(batch_size: int, seq_len: bool = True) -> argparse.ArgumentParser:
    """--batch_size and (seq_len) --seq_len of the batches a command runs."""
    p = _parent()
    p.add_argument("--batch_size", "--batch-size", type=int, default=batch_size)
    if seq_len:
        p.add_argument("--seq_len", "--seq-len", type=int, default=None, help="default: the model's n_ctx")
    return p


def seed_flag(default: int | None = 1234, help: str | None = None) -> argparse.ArgumentParser:
    p = _parent()
    p.add_argument("--seed", type=int, default=default, help=help)
    return p


def device_flags(precision: bool = False) -> argparse.ArgumentParser:
    """--device and (precision) --precision."""
    p = _parent()
    p.add_argument("--device", default="auto")
    if precision:
        p.add_argument("--precision", default="auto", choices=PRECISIONS,
                       help="auto: bf16 autocast on CUDA, fp32 elsewhere (as in training)")
    return p


def split_command_line(parser: argparse.ArgumentParser, argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate ``--key value`` config overrides from the subcommand's own arguments,
    so an override's value is never taken for a positional argument."""
    argv = list(argv)
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    command = next((t for t in argv if not t.startswith("-")), None)
    if sub is None or command not in sub.choices:
        return argv, []
    known = sub.choices[command]._option_string_actions
    own, overrides = [], []
    while argv:
        token = argv.pop(0)
        name = token.partition("=")[0]
        if token.startswith("--") and len(token) > 2 and name not in known:
            overrides.append(token)
            if "=" not in token and argv and not argv[0].startswith("--"):
                overrides.append(argv.pop(0))
        else:
            own.append(token)
    return own, overrides


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    own, rest = split_command_line(parser, sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(own)
    try:
        if rest and not args.overrides:
            raise ConfigError(f"unknown option {rest[0].partition('=')[0]} (see infmoe {args.command} --help)")
        with one_line_warnings(f"infmoe {args.command}"):  # an old option name: one line, as errors are
            status = args.handler(args, parse_overrides(rest, flags=BOOLEAN_SETTINGS, text=TEXT_SETTINGS))
    except InfmoeError as err:
        print(f"infmoe {args.command}: error: {err}", file=sys.stderr)
        return 2
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
