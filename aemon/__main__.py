"""``python -m aemon`` runs the command line."""

import sys

from aemon.cli import main

sys.exit(main())
