"""`python -m bridge.simulator ...` = `racktwin simulate ...`."""

import sys

from ..cli import main

sys.exit(main(["simulate", *sys.argv[1:]]))
