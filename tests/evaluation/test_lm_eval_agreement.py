"""The real `lm_eval` CLI on an exported model agrees exactly with `infmoe zeroshot`."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from infmoe import build_model
from infmoe.checkpoint import save_checkpoint
from infmoe.data import Tokenizer
from infmoe.evaluation.tasks import load_task
from infmoe.evaluation.zeroshot import evaluate_task
from infmoe.hf import export_hf

TASK_DIR = Path(__file__).resolve().parents[2] / "lm_eval_tasks"


def sentences(corpus: Path) -> list[str]:
    words = corpus.read_text(encoding="utf-8").split()
    return [" ".join(words[i : i + 6]) for i in range(0, 6 * 200, 6)]


def write_tasks(folder: Path, corpus: Path) -> None:
    """Small PIQA and ARC-Easy files in their original layouts, and the shipped task YAMLs
    pointed at them."""
    rng = random.Random(0)
    text = sentences(corpus)
    piqa = [{"goal": text[3 * i], "sol1": text[3 * i + 1], "sol2": text[3 * i + 2], "label": rng.randint(0, 1)}
            for i in range(30)]
    arc = [{"id": str(i), "answerKey": "ABCD"[i % 4],
            "question": {"stem": text[100 + i], "choices": [{"text": text[150 + (i + j) % 50], "label": "ABCD"[j]}
                                                             for j in range(4)]}} for i in range(20)]
    for name, records in (("piqa", piqa), ("arc_easy", arc)):
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in records))
        yaml = (TASK_DIR / f"infmoe_{name}.yaml").read_text()
        yaml = yaml.replace(f"../shared/data/eval/{name}/dev.jsonl", str(data))
        assert str(data) in yaml
        (folder / f"infmoe_{name}.yaml").write_text(yaml)


def test_lm_eval_accuracy_equals_infmoe_zeroshot(tmp_path, corpus):
    tokenizer = Tokenizer.train_bpe(sentences(corpus), 300, progress=False)
    torch.manual_seed(0)
    model = build_model(dict(vocab_size=tokenizer.vocab_size, n_ctx=128, n_layer=1, d_model=32, n_head=2,
                             ffn="infmoe", ffn_options=dict(d_z=4, mode="mean")))
    save_checkpoint(tmp_path / "model.safetensors", model, tokenizer_files=tokenizer.files())
    export = export_hf(tmp_path / "model.safetensors", tmp_path / "hf")
    write_tasks(tmp_path, corpus)

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"),
               TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={export},trust_remote_code=True",
         "--tasks", "infmoe_piqa,infmoe_arc_easy", "--include_path", str(tmp_path), "--device", "cpu",
         "--batch_size", "4", "--output_path", str(tmp_path / "results")],
        capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (results_file,) = (tmp_path / "results").rglob("results_*.json")
    harness = json.loads(results_file.read_text())["results"]

    for name in ("piqa", "arc_easy"):
        ours = evaluate_task(model, tokenizer, load_task(name, tmp_path / f"{name}.jsonl"), progress=False)
        theirs = harness[f"infmoe_{name}"]
        assert theirs["acc,none"] == ours["acc"], name
        assert theirs["acc_norm,none"] == ours["acc_norm"], name
        assert theirs["acc_stderr,none"] == pytest.approx(ours["acc_stderr"], abs=1e-12)
