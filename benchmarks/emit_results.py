"""Print a benchmark's markdown report and, with --out, keep it with the command that made it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional


def emit(lines: list[str], out: Optional[Path]) -> None:
    report = "\n".join(lines)
    print(report)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        script = Path(sys.argv[0]).name
        out.write_text(report + f"\n\nCommand: `python benchmarks/{script} {' '.join(sys.argv[1:])}`\n")
