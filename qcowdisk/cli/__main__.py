"""`python -m qcowdisk.cli`: the `qcowdisk` command, as `python -m qcowdisk`."""

import sys

from . import main

sys.exit(main())
