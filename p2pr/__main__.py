"""`python -m p2pr`: the `p2pr` command."""

import sys

from p2pr.cli import main

sys.exit(main())
