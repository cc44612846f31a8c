"""`python -m infmoe ...` = `infmoe ...`."""

import sys

from infmoe.launch import main

if __name__ == "__main__":
    sys.exit(main())
