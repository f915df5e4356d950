"""`python -m qcowdisk`: the `qcowdisk` command."""

import sys

from .cli import main

sys.exit(main())
