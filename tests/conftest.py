"""Shared fixtures: a small real-text corpus and a prepared-data cache for the session."""

from __future__ import annotations

import os
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


class FullDisk:
    """A folder where writing fails for real because the disk is full.

    kind "tmpfs" (where this process may mount, as root): `folder` is a small tmpfs and
    `fill(free)` writes a filler file until only `free` bytes are left, so writes fail with
    ENOSPC. kind "file-size-limit": `folder` is an ordinary folder and `run` applies
    RLIMIT_FSIZE = `free` to the command, so the kernel refuses any file that grows past it
    (EFBIG; Python ignores SIGXFSZ). Either way the failure comes from the operating
    system, not from a patched function.
    """

    def __init__(self, folder, kind: str, size: int = 64 * 2**20) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.free, self.mounted = folder, None, False
        if kind == "tmpfs":
            assert _mount_tmpfs(folder, size), f"cannot mount a tmpfs at {folder}"
            self.mounted = True

    def fill(self, free: int) -> None:
        """Leave `free` bytes writable (tmpfs), or limit every file the command writes to `free` bytes."""
        self.free = free
        if self.mounted:
            (self.folder / ".filler").unlink(missing_ok=True)  # measure the space without the last filler
            stat = os.statvfs(self.folder)
            left = stat.f_bavail * stat.f_frsize - free
            with open(self.folder / ".filler", "wb") as f:
                f.write(b"\0" * max(0, left))

    def run(self, argv: list[str], **kwargs):
        """`python -m infmoe.cli argv` in a subprocess on the full disk."""
        import resource
        import subprocess
        import sys

        limit = None if self.mounted or self.free is None else self.free

        def apply_limit() -> None:
            if limit is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        env = dict(os.environ, OMP_NUM_THREADS="1")
        return subprocess.run([sys.executable, "-m", "infmoe", *argv], capture_output=True, text=True,
                              preexec_fn=apply_limit, env=env, timeout=300, **kwargs)

    def close(self) -> None:
        import subprocess

        if self.mounted:
            subprocess.run(["umount", "-l", str(self.folder)], capture_output=True)


def _mount_tmpfs(folder, size: int) -> bool:
    import subprocess

    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


def _full_disk_kinds() -> list[str]:
    """Both kinds where a tmpfs can be mounted (root), so both stay tested; else the limit."""
    import tempfile

    with tempfile.TemporaryDirectory() as probe:
        if _mount_tmpfs(probe, 2**20):
            import subprocess

            subprocess.run(["umount", probe], capture_output=True)
            return ["tmpfs", "file-size-limit"]
    return ["file-size-limit"]


@pytest.fixture(params=_full_disk_kinds())
def full_disk(tmp_path, request):
    """A `FullDisk` at tmp_path/disk, of each kind this machine allows; unmounted afterwards."""
    disk = FullDisk(tmp_path / "disk", request.param)
    yield disk
    disk.close()
