"""``python -m resilience.weights {run,generate} ...``."""

import sys

from resilience.weights.cli import main

sys.exit(main())
