"""``python -m splitlearn_async`` runs the ``splitlearn`` command."""

import sys

from .cli import main

sys.exit(main())
