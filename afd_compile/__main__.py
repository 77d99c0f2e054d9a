"""`python -m afd_compile ...` runs the `afd` CLI (where the entry point is not installed)."""

import sys

from afd_compile.cli import main

sys.exit(main())
