"""`python -m launcher.shards`: the command lives in launcher/data/writer.py."""

import sys

from launcher.data.writer import main

if __name__ == "__main__":
    sys.exit(main())
