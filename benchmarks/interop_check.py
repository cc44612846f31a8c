"""Agreement figures for docs/huggingface.md: max |Δlogit| between our model and what
transformers loads from an export, and between an imported GPT-2 and transformers' own.

    python benchmarks/interop_check.py
"""

import os
import tempfile
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel  # noqa: E402

from infmoe import build_model, sampling  # noqa: E402
from infmoe.checkpoint import save_checkpoint  # noqa: E402
from infmoe.data import Tokenizer  # noqa: E402
from infmoe.hf import export_hf, import_gpt2  # noqa: E402
from infmoe.markdown import markdown_row, markdown_table  # noqa: E402


def main() -> None:
    from pydoc_data.topics import topics

    tokenizer = Tokenizer.train_bpe([topics[k] for k in sorted(topics)][:200], 1024, progress=False)
    idx = torch.randint(0, tokenizer.vocab_size, (2, 256), generator=torch.Generator().manual_seed(0))
    print("\n".join(markdown_table(["model", "setting", "max abs difference of logits"], [])))  # rows as they come
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("tiny-dense", "tiny-moe", "tiny-infmoe"):
            torch.manual_seed(0)
            ours = build_model(name, vocab_size=tokenizer.vocab_size).eval()
            ckpt = Path(tmp) / f"{name}.safetensors"
            save_checkpoint(ckpt, ours, tokenizer_files=tokenizer.files())
            theirs = AutoModelForCausalLM.from_pretrained(export_hf(ckpt, Path(tmp) / name), trust_remote_code=True)
            settings = [("sample", 1), ("sample", 4), ("mean", 1)] if name.endswith("infmoe") else [("-", 1)]
            for mode, k in settings:
                theirs.config.update({"mode": mode, "n_samples": k} if mode != "-" else {})
                with torch.no_grad(), sampling(ours, n_samples=k, mode=mode if mode != "-" else None):
                    torch.manual_seed(1)
                    a = ours(idx).logits
                    torch.manual_seed(1)
                    b = theirs(idx).logits
                label = "trust_remote_code" + (f", mode={mode}, K={k}" if mode != "-" else "")
                print(markdown_row([f"{name} export", label, f"{(a - b).abs().max().item():.2e}"]))
        eot = tokenizer.eot_id
        hf = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=192, n_head=6, vocab_size=tokenizer.vocab_size,
                                        n_positions=256, bos_token_id=eot, eos_token_id=eot)).eval()
        hf.save_pretrained(Path(tmp) / "gpt2")
        ours = import_gpt2(Path(tmp) / "gpt2").eval()
        with torch.no_grad():
            diff = (ours(idx).logits - hf(idx).logits).abs().max().item()
        print(markdown_row(["GPT-2 (4 x 192) import", "vs GPT2LMHeadModel", f"{diff:.2e}"]))


if __name__ == "__main__":
    main()
