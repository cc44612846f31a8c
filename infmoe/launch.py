"""The `infmoe` command's entry point: Ctrl-C at any moment, imports included, exits with
status 130 and one line instead of a traceback from whatever was loading."""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    try:
        # Ctrl-C is held back while torch and friends import (seconds), then raised here:
        # a library importing under a bare `except:` would otherwise swallow it, and the
        # command would run on as if never interrupted.
        held = _hold_sigint()
        try:
            from infmoe.cli import main as run
        finally:
            _release_sigint(held)
        return run(argv)
    except KeyboardInterrupt:
        command = next((a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")), None)
        print(f"infmoe {command}: interrupted" if command else "infmoe: interrupted", file=sys.stderr)
        return 130


def _hold_sigint() -> bool:
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no signal masks
        return False
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    return True


def _release_sigint(held: bool) -> None:
    if held:  # a SIGINT that came meanwhile is delivered now, as KeyboardInterrupt
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


if __name__ == "__main__":
    sys.exit(main())
