"""`python -m launcher.predict`: the command lives in launcher/commands/predict.py."""

import sys

from launcher.commands.predict import main

if __name__ == "__main__":
    sys.exit(main())
