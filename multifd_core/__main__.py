"""``python -m multifd_core``: the ``multifd`` command."""

import sys

from multifd_core.cli import main

sys.exit(main())
