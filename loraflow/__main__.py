"""`python -m loraflow ...` is the `loraflow` command line (the local stack starts its services this way)."""

import sys

from loraflow.cli import main

sys.exit(main())
