"""`python -m launcher.slurm`: the command lives in launcher/cluster/slurm.py."""

import sys

from launcher.cluster.slurm import main

if __name__ == "__main__":
    sys.exit(main())
