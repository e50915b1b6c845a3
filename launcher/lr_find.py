"""`python -m launcher.lr_find`: the command lives in launcher/commands/lr_find.py."""

import sys

from launcher.commands.lr_find import main

if __name__ == "__main__":
    sys.exit(main())
