"""`python -m hmamba` runs the `hmamba` command line."""

import sys

from .cli import main

sys.exit(main())
