"""`python -m heartmula_rt.cli`: the `heartmula-rt` command."""

import sys

from heartmula_rt.cli import main

sys.exit(main())
