"""`python -m proxy.cli ...`: the same as the `summon` console script."""

import sys

from .main import main

sys.exit(main())
