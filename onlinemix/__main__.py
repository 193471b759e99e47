"""``python -m onlinemix``: the command line (the same as the ``onlinemix`` script)."""

import sys

from onlinemix.cli import main

sys.exit(main())
