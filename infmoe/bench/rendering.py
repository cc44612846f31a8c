"""A bench result as markdown: a header naming the machine, then each table and the targets;
`render` reads a saved result back, `save` writes one."""

from __future__ import annotations

import json
import os
from pathlib import Path

from infmoe.bench.memory import CACHE_FACTOR
from infmoe.bench.targets import targets
from infmoe.errors import InfmoeError
from infmoe.io import write_text
from infmoe.markdown import markdown_table, number_cell

DTYPE_LABELS = {"float32": "fp32", "bfloat16": "bf16 autocast", "float16": "fp16 autocast", "float64": "fp64"}


def dtype_label(machine: dict) -> str:
    """How the header names the dtype that ran. Results saved before the field existed
    were all fp32: the bench had no other mode then."""
    dtype = machine.get("dtype", "float32")
    return DTYPE_LABELS.get(dtype, dtype)


def _path(row: dict) -> str:
    """The path cell: "—" for a layer without paths, "-" where the result predates the field."""
    return row.get("path") or ("—" if "path" in row else "-")


def _of_limit(row: dict) -> float | None:
    """Executed GFLOP/s over the matmul limit; None where the result predates the field."""
    return row["executed_gflops"] / row["matmul_limit_gflops"] if "executed_gflops" in row else None


def _layer_lines(result: dict) -> list[str]:
    rows = [r for r in result["layers"] if not r.get("compiled")]
    if not rows:
        return []
    header = ["shape", "variant", "path", "union", "fwd ms", "fwd+bwd ms", "vs dense active", "vs dense full",
              "GFLOP/s", "executed GFLOP/s", "executed of matmul limit", "saved MB", "peak MB"]
    cells = [[r["shape"], r["variant"], _path(r), number_cell(r["union"], ".3f"), f"{r['fwd_ms']:.1f}",
              f"{r['fwd_bwd_ms']:.1f}", f"{r['vs_dense']:.2f}", number_cell(r.get("vs_full"), ".2f"),
              f"{r['gflops']:.0f}", number_cell(r.get("executed_gflops"), ".0f"),
              number_cell(_of_limit(r), ".0%"),
              number_cell(r.get("saved_mb"), ".0f"), number_cell(r.get("peak_mb"), ".0f")] for r in rows]
    lines = ["Training, one FFN layer, forward+backward; ratios to the dense MLP of the active width H/2 and of "
             "the full width H:", "", *markdown_table(header, cells), ""]
    if "transformers" in result["machine"] and result["machine"]["transformers"] is None:
        lines += ["No HF Mixtral peer rows: transformers does not import here.", ""]
    return lines


def _compiled_lines(result: dict) -> list[str]:
    rows = [r for r in result["layers"] if r.get("compiled")]
    if not rows:
        return []
    header = ["shape", "variant", "path", "union", "fwd+bwd ms", "vs compiled dense active", "vs compiled dense full",
              "vs eager", "GFLOP/s", "executed GFLOP/s", "saved MB"]
    cells = [[r["shape"], r["variant"], f"did not compile: {r['error']}", *["-"] * 8] if "error" in r else
             [r["shape"], r["variant"], _path(r), number_cell(r["union"], ".3f"), f"{r['fwd_bwd_ms']:.1f}",
              number_cell(r["vs_dense"], ".2f"), number_cell(r["vs_full"], ".2f"), number_cell(r["vs_eager"], ".2f"),
              f"{r['gflops']:.0f}", f"{r['executed_gflops']:.0f}", number_cell(r.get("saved_mb"), ".0f")]
             for r in rows]
    return [f"Training, one FFN layer, compiled (`torch.compile(fullgraph=True)`, "
            f"{result['machine'].get('compile_backend')}; compiled before the timing), forward+backward, timed "
            "alternated with the eager rows; ratios to the compiled dense MLPs and to the same layer eager:", "",
            *markdown_table(header, cells), ""]


def _saved_lines(result: dict) -> list[str]:
    rows = result.get("saved", [])
    if not rows:
        return []
    return [f"Saved for backward, MB: ∞-MoE B=1 on {rows[0]['tokens']} tokens, per K (what autograd keeps "
            "between forward and backward, parameters and input excluded):", "",
            *markdown_table(["shape", "K", "path", "saved MB", "vs K=1"],
                            [[r["shape"], str(r["samples"]), _path(r), f"{r['saved_mb']:.1f}", f"{r['vs_k1']:.2f}"]
                             for r in rows]), ""]


def _decode_lines(result: dict) -> list[str]:
    decode = result.get("decode", [])
    if not decode:
        return []
    budget = decode[0]["budget_bytes"]
    cache = result["machine"].get("l3_bytes") or budget / CACHE_FACTOR
    header = ["shape", "tokens", "variant", "path", "union", "copies x MB", "calls", "ms", "vs dense active",
              "vs dense full"]
    rows = [[r["shape"], str(r["tokens"]), r["variant"], _path(r), number_cell(r["union"], ".3f"),
             f"{r['copies']} x {r['copy_bytes'] / 2**20:.1f}", str(r["calls"]), f"{r['ms']:.3f}", f"{r['vs_dense']:.2f}",
             f"{r['vs_full']:.2f}"] for r in decode]
    return [f"Decoding, one FFN layer, no grad, median of the calls; each call on the next of a variant's copies, "
            f"which hold >= {budget / 2**20:g} MiB of weights ({budget / cache:g} x the {cache / 2**20:g} MiB L3 "
            "cache), so weights come from memory:", "",
            *markdown_table(header, rows), ""]


def _model_lines(result: dict) -> list[str]:
    lines = []
    if result["models"]:
        compiled = any(r.get("compiled") for r in result["models"])
        lines += ["Whole model, training: the training step (forward, backward, gradient clipping, AdamW)"
                  + ("; --compile rows with the forward compiled as `infmoe train --compile` does" * compiled) + ":",
                  ""]
        lines += markdown_table(["config", "training tokens/s", "vs dense", "ms/step"],
                                [[r["config"], f"did not compile: {r['error']}", "-", "-"] if "error" in r else
                                 [r["config"], f"{r['tokens_per_s']:.0f}", f"{r['vs_dense']:.2f}",
                                  f"{r['step_ms']:.0f}"] for r in result["models"]]) + [""]
    if result.get("generation"):
        runs = result["generation"][0].get("runs", result["repeats"])
        lines += [f"Whole model, generation: `generate` with a KV cache, batch 1, greedy, random weights; median of "
                  f"{runs} runs:", ""]
        lines += markdown_table(["model", "new tokens", "tokens/s", "vs dense", "ms/token"],
                                [[r["variant"], str(r["new_tokens"]), f"{r['tokens_per_s']:.1f}",
                                  f"{r['vs_dense']:.2f}", f"{r['ms_per_token']:.2f}"]
                                 for r in result["generation"]]) + [""]
    return lines


def _target_lines(result: dict) -> list[str]:
    checks = targets(result)
    if not checks:
        return ["Targets: none of their rows were measured in this run (they are set at the tiny and gpt2-small "
                "shapes and the tiny and gpt2-small models)."]
    return ["Targets:", "", *markdown_table(
        ["what", "measured", "target", "met"],
        [[c["what"], f"{c['measured']:.2f}", f"{c['op']} {c['limit']:g}", "yes" if c["met"] else "no"]
         for c in checks]), ""]


def markdown(result: dict) -> str:
    """The result as markdown tables."""
    m = result["machine"]
    versions = f"torch {m['torch']}" + (f", transformers {m['transformers']}" if m.get("transformers") else "")
    lines = [f"{m['device']} ({m['gpu'] or m['processor']}), {m['threads']} threads, {versions}, "
             f"{dtype_label(m)}; median of {result['repeats']} repeats, variants alternated", ""]
    lines += _layer_lines(result) + _compiled_lines(result) + _saved_lines(result) + _decode_lines(result)
    lines += _model_lines(result) + _target_lines(result)
    return "\n".join(lines).rstrip("\n") + "\n"


def render(path: str | os.PathLike) -> tuple[dict, str]:
    """The result `--json` saved at `path`, and its tables (`markdown`). One-line
    `InfmoeError` when the file is missing, is not JSON, or is not such a result."""
    path = Path(path)
    again = "give a file that infmoe bench --json wrote"
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise InfmoeError(f"cannot read {path}: {err.strerror or err}; {again}") from None
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise InfmoeError(f"{path} is not JSON ({type(err).__name__}): {again}") from None
    if not isinstance(result, dict):
        raise InfmoeError(f"{path} holds a JSON {type(result).__name__}, not a bench result: {again}")
    try:
        return result, markdown(result)
    # Results of older versions lack newer fields and still render; a file that breaks the
    # rendering is foreign or damaged.
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
        lacks = f"it has no {err.args[0]!r} where a bench result has one" if isinstance(err, KeyError) else \
            f"its fields are not those of a bench result ({type(err).__name__})"
        raise InfmoeError(f"{path} is not a result of infmoe bench --json: {lacks}; {again}") from None


def save(result: dict, json_path: str | None, markdown_path: str | None) -> None:
    if json_path:
        write_text(json_path, json.dumps(result, indent=1) + "\n")
    if markdown_path:
        write_text(markdown_path, markdown(result))
