"""`python -m orchestrator` is the same as `orch`."""

import sys

from orchestrator.cli import main

sys.exit(main())
