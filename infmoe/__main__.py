"""`python -m infmoe ...` = `infmoe ...`; also the form torchrun launches (docs/distributed.md):

    torchrun --nproc_per_node 4 -m infmoe train --config gpt2-small-infmoe --data hf:openwebtext
"""

import sys

from infmoe.launch import main

if __name__ == "__main__":
    sys.exit(main())
