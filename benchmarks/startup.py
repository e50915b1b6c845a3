"""How fast the command line answers, side by side with an earlier commit of this repository.

    python benchmarks/startup.py --baseline 308766b --out benchmarks/results/startup.md

Each command runs in a fresh interpreter, from this checkout and from the baseline commit (a
temporary git worktree, the same Python and packages), `--repeats` times in alternation; the
table gives the median wall time. `--check` runs on the digits shards (written once to a
temporary folder), each time with an empty cache folder (XDG_CACHE_HOME), as on a new machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.emit_results import emit  # noqa: E402

GOALS = {"--help": 1.0, "--list-plugins": 1.0, "unknown key": 1.0, "bad plugin option": 1.0, "--check": 4.0}


def commands(data: dict) -> dict[str, tuple[list[str], int]]:
    """name -> (arguments of `python -m launcher`, expected exit code)."""
    recipe = "recipes/digits.yaml"
    shards = [f"data.train={data['train']}", f"data.val={data['val']}"]
    return {
        "--help": (["--help"], 0),
        "--list-plugins": (["--list-plugins"], 0),
        "unknown key": ([recipe, "optimzer.lr=0.1"], 2),
        "bad plugin option": ([recipe, "plugins.ema.decay=abc"], 2),
        "--check": (["--check", recipe, *shards], 0),
    }


def timed(tree: Path, args: list[str], expected: int, cache: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree), "XDG_CACHE_HOME": str(cache), "CUDA_VISIBLE_DEVICES": ""}
    env.pop("LAUNCHER_PLUGINS", None)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "launcher", *args], cwd=tree, env=env, capture_output=True,
                            text=True)
    seconds = time.perf_counter() - start
    if result.returncode != expected:
        raise SystemExit(f"`python -m launcher {' '.join(args)}` in {tree} exited {result.returncode}, not "
                         f"{expected}:\n{result.stderr[-2000:]}")
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default=None, help="a git commit to measure beside this checkout")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        from launcher.data.writer import main as write_shards

        if write_shards(["digits", "--out", str(tmp / "digits")]) != 0:
            raise SystemExit("could not write the digits shards")
        import json

        data = json.loads((tmp / "digits" / "info.json").read_text())
        trees = {"this checkout": REPO}
        if args.baseline:
            subprocess.run(["git", "worktree", "add", "--detach", str(tmp / "baseline"), args.baseline], cwd=REPO,
                           check=True, capture_output=True)
            trees[f"baseline {args.baseline}"] = tmp / "baseline"
        try:
            times: dict[tuple[str, str], list[float]] = {}
            for repeat in range(args.repeats):
                for name, (cli, expected) in commands(data).items():
                    for label, tree in trees.items():
                        cache = tmp / "cache" / f"{label}-{name}-{repeat}"  # empty: a new machine's
                        times.setdefault((name, label), []).append(timed(tree, cli, expected, cache))
        finally:
            if args.baseline:
                subprocess.run(["git", "worktree", "remove", "--force", str(tmp / "baseline")], cwd=REPO,
                               check=False, capture_output=True)
    labels = list(trees)
    lines = ["| command | " + " | ".join(f"{label} s" for label in labels) + " | goal s |",
             "|---|" + "---|" * (len(labels) + 1)]
    for name in commands(data):
        cells = [f"{statistics.median(times[(name, label)]):.2f}" for label in labels]
        lines.append(f"| `{name}` | " + " | ".join(cells) + f" | {GOALS.get(name, '-')} |")
    import torch

    lines += ["", f"Median wall time of {args.repeats} fresh `python -m launcher ...` processes each (imports "
              f"included), this checkout and the baseline in alternation; {os.cpu_count()} CPU cores, Python "
              f"{sys.version.split()[0]}, torch {torch.__version__}. `unknown key`: `recipes/digits.yaml "
              "optimzer.lr=0.1`; `bad plugin option`: `plugins.ema.decay=abc`; `--check` on the digits shards, "
              "with an empty cache folder each time."]
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
