"""`python -m lowbit.cli`: the `lowbit` command."""

import sys

from lowbit.cli import main

if __name__ == "__main__":
    sys.exit(main())
