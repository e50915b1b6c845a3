"""`python -m launcher.average`: the command lives in launcher/commands/average.py."""

import sys

from launcher.commands.average import main

if __name__ == "__main__":
    sys.exit(main())
