"""`python -m launcher.report`: the command lives in launcher/commands/report.py."""

import sys

from launcher.commands.report import main

if __name__ == "__main__":
    sys.exit(main())
