"""`python -m runtime.cli ...` runs the `blip2-edge` command."""

import sys

from runtime.cli.main import main

sys.exit(main())
