"""The old torchrun entry, `-m infmoe.train ...`: now `-m infmoe train ...` (`infmoe.__main__`).

This module's name read as a sibling of the `infmoe.training` package; the command line
has one entry point, and torchrun reaches it as `python -m infmoe` does. Kept so that
scripts written before still run: it forwards to `infmoe train` after one line of notice.
"""

import os
import sys

from infmoe.launch import main

if __name__ == "__main__":
    if os.environ.get("RANK", "0") == "0":  # torchrun starts one process per rank: one notice
        print("infmoe train: warning: -m infmoe.train is now -m infmoe train (a space, not a dot); "
              "the old form still works for now", file=sys.stderr)
    sys.exit(main(["train", *sys.argv[1:]]))
