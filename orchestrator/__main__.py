"""`python -m orchestrator` is the same as `orch`."""

import sys

from orchestrator.cli.main import main

sys.exit(main())
