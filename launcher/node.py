"""`python -m launcher.node`: the command lives in launcher/cluster/node.py."""

import sys

from launcher.cluster.node import main

if __name__ == "__main__":
    sys.exit(main())
