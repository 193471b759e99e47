"""``python -m onlinemix``: the command line (the same as the ``onlinemix`` script)."""

import sys

from onlinemix.cli import main

if __name__ == "__main__":  # not when a tool imports the module to read it
    sys.exit(main())
