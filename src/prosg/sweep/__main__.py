"""``python -m prosg.sweep`` == ``prosg sweep``; ``--run-one RUN_DIR`` is how both launchers start a run."""

import sys

from prosg.errors import ProSGError
from prosg.sweep.cli import main

try:
    sys.exit(main())
except ProSGError as e:
    print(f"prosg sweep: error: {e}", file=sys.stderr)
    sys.exit(1)
