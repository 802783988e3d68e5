"""`python -m moemerge` (and `torchrun -m moemerge`) runs the CLI."""

import sys

from moemerge.cli import main

sys.exit(main())
