"""`python -m rsae.cli`: the `rsae` command."""

import sys

from rsae.cli import main

sys.exit(main())
