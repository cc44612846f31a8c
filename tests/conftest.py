"""Shared fixtures: a small real-text corpus and a prepared-data cache for the session."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# A model small enough that a training step takes milliseconds on one core.
MICRO = dict(n_layer=2, d_model=32, n_head=2, n_ctx=32)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """About 200 KB of real English: Python's own language-reference topics."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k].strip() for k in sorted(topics))[:200_000]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def micro(corpus, cache_dir):
    """micro(out_dir, **overrides) → --key value settings for a seconds-long training run."""

    def settings(out_dir: Path, **overrides) -> dict:
        base = dict(config="tiny-infmoe", data=str(corpus), cache_dir=str(cache_dir), out_dir=str(out_dir),
                    tokenizer="bpe", tokenizer_vocab=512, batch_size=4, max_steps=8, warmup_steps=2,
                    eval_interval=4, eval_tokens=2048, log_interval=2, save_interval=4, progress=False,
                    tensorboard=False, **MICRO)
        return base | overrides

    return settings
