"""`python -m lowbit`: the `lowbit` command, so that `torchrun ... -m lowbit quantize ...` runs it on
every rank (README: Several processes and machines)."""

import sys

from lowbit.cli import main

if __name__ == "__main__":
    sys.exit(main())
