"""``python -m graft`` (and ``torchrun -m graft``) run the CLI."""

import sys

from .cli import main

sys.exit(main())
