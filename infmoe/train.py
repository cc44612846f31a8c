"""`python -m infmoe.train ...` = `infmoe train ...`; the form torchrun launches:

    torchrun --nproc_per_node 4 -m infmoe.train --config gpt2-small-infmoe --data openwebtext
"""

import sys

from infmoe.launch import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
