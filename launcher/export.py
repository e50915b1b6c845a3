"""`python -m launcher.export`: the command lives in launcher/commands/export.py."""

import sys

from launcher.commands.export import main

if __name__ == "__main__":
    sys.exit(main())
