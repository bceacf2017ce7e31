"""`python -m wallbreak.cli`: the same as the `wallbreak` command."""

import sys

from wallbreak.cli import main

sys.exit(main())
