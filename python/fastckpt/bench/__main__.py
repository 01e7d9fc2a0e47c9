"""`python -m fastckpt.bench ...` is `fastckpt bench ...`."""

import sys

from fastckpt.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
