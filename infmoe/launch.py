"""The `infmoe` command's entry point: Ctrl-C at any moment, imports included, exits with
status 130 and one line instead of a traceback from whatever was loading."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    try:
        from infmoe.cli import main as run  # torch and friends: seconds of imports

        return run(argv)
    except KeyboardInterrupt:
        command = next((a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")), None)
        print(f"infmoe {command}: interrupted" if command else "infmoe: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
