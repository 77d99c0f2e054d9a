import sys

from afd_compile.cli import main

sys.exit(main())
