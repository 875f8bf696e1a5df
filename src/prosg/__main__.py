"""``python -m prosg`` == the ``prosg`` console script."""

import sys

from prosg.cli import main

sys.exit(main())
