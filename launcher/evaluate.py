"""`python -m launcher.evaluate`: the command lives in launcher/commands/evaluate.py."""

import sys

from launcher.commands.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
