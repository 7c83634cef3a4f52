"""`python -m scripts.sdk_compat`: the table for the installed SDK against a live tinkerd."""

import sys

from scripts.sdk_compat.cli import main

sys.exit(main())
