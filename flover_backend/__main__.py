"""`python -m flover_backend ...` runs the `flover` command."""

import sys

from flover_backend.cli import main

sys.exit(main())
