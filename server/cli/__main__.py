"""``python -m server.cli``: the operator CLI."""

import sys

from server.cli import main

sys.exit(main())
