"""The practitioners' ladder on real data: a recipe with tricks added one rung at a time, as in
the reference CIFAR-100 table (../shared/TRICKS.md), plus tricks tried on their own, 3 seeds.

    python benchmarks/ladder.py                      # Fashion-MNIST (about 3 hours on 2 CPU cores)
    python benchmarks/ladder.py --data digits        # scikit-learn's digits (grown from ablation.py)
    python benchmarks/ladder.py --table-only         # table and plot of the runs finished so far

Every (rung, seed) is an ordinary run directory under --runs, checkpointed each epoch, so a
ladder that is stopped (Ctrl-C, a session ending, kill) continues where it stopped when run
again: finished runs are read, an interrupted one resumes from its last checkpoint (the
launcher's own resume), the others start. Each finished run's result is also recorded in a JSON
file next to --out (with the overrides it ran with), so a ladder spread over several machines or
sittings, whose run directories are gone, keeps its finished runs. Each record holds the run's
resolved recipe (the settings that decide its result), so a run made before the recipe under the
ladder changed is trained again, never reported as the new recipe's; a finished run directory of
another recipe is refused. Seeds go round the rungs (seed 0 of every rung, then seed 1, ...), so a
ladder stopped early still has every rung.

The reported top-1 is the final evaluation of the model one would ship (EMA and TTA where
they are on); the plain model's top-1 is kept beside it. Results: --out (markdown) and the
plot next to it (.png), with the published references for the data set.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.emit_results import emit  # noqa: E402
from launcher.errors import LauncherError  # noqa: E402
from launcher.experiment.results import DamagedRun, check_recorded_result, run_result  # noqa: E402


@dataclass
class Rung:
    name: str
    adds: str
    overrides: list[str]
    alone: bool = False  # on the baseline only, not on the rungs above it


@dataclass
class Ladder:
    recipe: str
    about: str
    base: list[str]  # overrides that make the recipe the ladder's baseline
    rungs: list[Rung]
    references: list[str] = field(default_factory=list)
    source: str = ""  # launcher.shards' name for the data set (default: the ladder's name)
    train_images: int | None = None  # train on the first N training images only (None: all)

    def setting(self) -> list[str]:
        """What a run's record says about its data besides the overrides."""
        return [f"(train images: {self.train_images or 'all'})"]


FASHION_REFERENCES = [
    "| model (published, GPU, long schedules) | test top-1 % | source |",
    "|---|---|---|",
    "| 2-conv nets | 91.6-92.5 | the data set's benchmark table (zalandoresearch/fashion-mnist) |",
    "| ResNet-18 | 94.9 | same |",
    "| DenseNet-BC 768K | 95.4 | same |",
    "| WRN-40-4 | 96.7 | same |",
    "| ResNet-20, 300 epochs: baseline -> + random erasing | 95.61 -> 95.98 | Zhong et al., Random Erasing (AAAI 2020) |",
    "| WRN-28-10, 300 epochs: baseline -> + random erasing | 95.99 -> 96.35 | same (recipes/fashion_mnist_wrn.yaml) |",
]


def fashion_rungs(auto_augment: str, auto_augment_overrides: list[str]) -> list[Rung]:
    return [
        Rung("baseline", "crop + flip, SGD (lr 0.1, batch 128), cosine: no other trick", []),
        Rung("+ SAM", "rho 0.05", ["plugins.sam={rho: 0.05}"]),
        Rung("+ label smoothing", "0.1", ["plugins.label_smoothing={smoothing: 0.1}"]),
        Rung("+ AutoAugment", auto_augment, ["data.augment.auto_augment=cifar10", *auto_augment_overrides]),
        Rung("+ random erasing", "p = 0.25 (timm)", ["data.augment.random_erasing=0.25"]),
        Rung("+ TTA", "flip", ["plugins.tta={flip: true}"]),
        Rung("mixup / cutmix", "on the baseline: alpha 0.2 / 1.0, switching", ["plugins.mixup={}"], alone=True),
        Rung("EMA", "on the baseline: decay 0.999, warmup", ["plugins.ema={decay: 0.999, warmup: true}"], alone=True),
    ]


# The recipe's own tricks come off for a ladder's baseline, and its batch, learning rate and TTA are
# pinned (batch 128, lr 0.1, no TTA below its rung: the values the 5k ladder's runs were made with).
FASHION_BASE = ["~plugins.label_smoothing", "data.augment.random_erasing=0.0", "data.batch_size=128", "optimizer.lr=0.1",
                "~plugins.tta"]

LADDERS = {
    "fashion-mnist": Ladder(
        recipe="recipes/fashion_mnist.yaml", source="fashion-mnist",
        about="Fashion-MNIST (the first 1,250 of the 60k training images, 144 epochs, WRN-10-2; the 10k test "
              "set is the val split; 28x28 grey)",
        # The regime the tricks are for: a model that fits its training set. The 5k ladder below
        # (WRN-10-1, 36 epochs) is not it: there every regulariser cost. Piloted with one seed of
        # the baseline and the last rung, at the same 180k training samples a run: WRN-10-2 on 5k
        # images for 36 epochs, baseline 88.49%, last rung 88.38%; on 2.5k for 72 epochs, 87.79% and
        # 88.56%; on 1.25k for 144 epochs, 85.39% (seed 1: 84.42%) and 87.91%: the smaller the
        # training set, the more the tricks give. Each run is 1,440 steps of 128; 13 run-lengths a
        # seed (the five rungs with SAM cost twice), two runs side by side (one thread each, about
        # 11 min a run-length): 3 seeds in about 3 hours on 2 CPU cores (measured: 5.8 CPU-hours, 24 runs).
        train_images=1250,
        base=[*FASHION_BASE, "model.name=wrn10_2", "data.augment_on=device", "train.epochs=144",
              "train.eval_every=144", "plugins.checkpoint={every_epochs: 24}"],
        rungs=fashion_rungs("torchvision's CIFAR-10 policy (batched, on the device)", []),
        references=FASHION_REFERENCES),
    "fashion-mnist-5k": Ladder(
        recipe="recipes/fashion_mnist.yaml", source="fashion-mnist",
        about="Fashion-MNIST (the first 5k of the 60k training images, 36 epochs; the 10k test set is the "
              "val split; 28x28 grey)",
        # Smaller and shorter than the recipe, so that 3 seeds of every rung fit in about 3 hours on
        # 2 CPU cores: WRN-10-1 (one block a stage) trains about 640 samples/s here, so 180k samples
        # (5 min) a run; 13 run-lengths a seed (the five rungs with SAM cost twice) x 3 seeds = 3.1 h.
        # The 180k samples are 36 epochs of the first 5k training images, not 3 epochs of all 60k: at
        # 3 epochs of the full set the model is still underfitting, and there the regularisers can
        # only cost (seed 0, measured: baseline 89.38%, + SAM 88.86%, + label smoothing 88.88%).
        train_images=5000,
        base=[*FASHION_BASE[:2], "model.name=wrn10_1", "train.epochs=36", "train.eval_every=36",
              "plugins.checkpoint={every_epochs: 6}", *FASHION_BASE[2:]],
        rungs=fashion_rungs("torchvision's CIFAR-10 policy (per sample, in the loader)", ["data.augment_on=loader"]),
        references=FASHION_REFERENCES),
    "digits": Ladder(
        recipe="recipes/digits.yaml",
        about="digits (scikit-learn, 1,437 train / 360 val, 8x8)",
        # ResNet-18 at 32 px: the setting of benchmarks/results/ablation.md (the demo recipe now trains a WRN-10-2 at 16 px).
        base=["model.name=resnet18", "data.image_size=32", "data.batch_size=64", "~plugins.report",
              "plugins.checkpoint={every_epochs: 5}"],
        rungs=[
            Rung("baseline", "digits.yaml: crop + rotation, SGD, cosine", []),
            Rung("+ random erasing", "p = 0.25", ["data.augment.random_erasing=0.25"]),
            Rung("+ AutoAugment", "SVHN policy (the CIFAR one flips)", ["data.augment.auto_augment=svhn"]),
            Rung("+ SAM", "rho 0.05", ["plugins.sam={rho: 0.05}"]),
            Rung("+ label smoothing", "0.1", ["plugins.label_smoothing={smoothing: 0.1}"]),
            Rung("+ TTA", "5 shifted views (2 px; a mirrored digit is another symbol)",
                 ["plugins.tta={flip: false, shift: 2}"]),
            Rung("+ EMA", "decay 0.99, warmup (230 steps)", ["plugins.ema={decay: 0.99, warmup: true}"]),
            Rung("+ mixup", "alpha 0.2 (no cutmix)", ["plugins.mixup={mixup_alpha: 0.2, cutmix_alpha: 0.0}"]),
        ]),
}

def rung_overrides(ladder: Ladder, index: int) -> list[str]:
    """A rung's overrides: its own on the baseline when alone, else every main rung up to it."""
    rung = ladder.rungs[index]
    if rung.alone:
        return list(rung.overrides)
    return [o for r in ladder.rungs[:index + 1] if not r.alone for o in r.overrides]


def slug(index: int, rung: Rung) -> str:
    words = "".join(c if c.isalnum() else "-" for c in rung.name.lower()).strip("-")
    return f"{index:02d}-{'-'.join(w for w in words.split('-') if w)}"


# Where a run's files are and how it is shown: not what decides its result.
NOT_THE_RESULT = ("seed", "run.", "data.train", "data.val")


def what_ran(recipe) -> dict:
    """A resolved recipe's settings that decide a run's result, flattened to dotted keys, values
    off their defaults only: a key added to the schema later (with a default that keeps what runs
    did) leaves old records valid; any change of what a run does makes a different dict."""
    from launcher.data.augment import SAME_ON_BOTH_PATHS
    from launcher.recipe import flatten
    from launcher.registry import parse_options

    tree = recipe.model_dump(mode="json", exclude_defaults=True)
    tree["plugins"] = {name: parse_options(name, options).model_dump(mode="json", exclude_defaults=True)
                       for name, options in recipe.plugins.items()}
    flat = flatten(tree)
    ops = {key.split(".")[2] for key in flat if key.startswith("data.augment.")}
    ignored = NOT_THE_RESULT + (("data.augment_on",) if ops <= SAME_ON_BOTH_PATHS else ())
    return {k: v for k, v in sorted(flat.items()) if not any(k == n or k.startswith(n) for n in ignored)}


def differences(recorded: dict, expected: dict) -> str:
    keys = sorted(k for k in set(recorded) | set(expected) if recorded.get(k) != expected.get(k))
    return "; ".join(f"{k}: {recorded.get(k, '(default)')!r} -> {expected.get(k, '(default)')!r}" for k in keys[:4]) \
        + (f"; and {len(keys) - 4} more" if len(keys) > 4 else "")


class Record:
    """The finished runs' results in a JSON file (committed next to the report), keyed by rung
    and seed, each with the overrides it ran with and its resolved recipe (what_ran): a run
    counts only for the recipe it was made with."""

    def __init__(self, path: Path | None):
        self.path = path
        self.runs = self.read(path) if path is not None and path.exists() else []

    @staticmethod
    def read(path: Path) -> list[dict]:
        """The record's runs; a record that is not one, or holds an impossible value (a top-1 of
        1.5, -0.4, text, NaN), is refused naming the entry: it would be reported as a result."""
        try:
            runs = json.loads(path.read_text())["runs"]
            if not isinstance(runs, list) or not all(isinstance(r, dict) for r in runs):
                raise TypeError("'runs' is not a list of entries")
            for entry in runs:
                check_recorded_result(entry.get("result"), f"the entry {entry.get('rung')!r} seed "
                                                           f"{entry.get('seed')!r} of record '{path}'")
        except DamagedRun as err:
            raise SystemExit(f"error: {err}. Fix or remove that entry (its run is trained again).") from None
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise SystemExit(f"error: record '{path}' is not a ladder record ({type(err).__name__}: {err}).") from None
        return runs

    def entry(self, rung: str, seed: int) -> dict | None:
        return next((r for r in self.runs if r["rung"] == rung and r["seed"] == seed), None)

    def find(self, rung: str, seed: int, overrides: list[str], recipe: dict) -> dict | None:
        entry = self.entry(rung, seed)
        if entry is None or entry["overrides"] != overrides or entry.get("recipe") != recipe:
            return None
        return entry["result"]

    def add(self, rung: str, seed: int, overrides: list[str], recipe: dict, result: dict) -> None:
        if self.path is None:
            return
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Under a lock, re-read and merged: two ladders sharing a record (say seeds 0 and 1 side by
        # side, a process each) each keep the other's runs.
        with open(self.path.with_suffix(".json.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            on_disk = json.loads(self.path.read_text())["runs"] if self.path.exists() else self.runs
            self.runs = [r for r in on_disk if not (r["rung"] == rung and r["seed"] == seed)]
            self.runs.append({"rung": rung, "seed": seed, "overrides": overrides, "recipe": recipe, "result": result})
            self.runs.sort(key=lambda r: (r["rung"], r["seed"]))
            temporary = self.path.with_suffix(".json.tmp")  # written whole, then renamed: a kill keeps the last one
            temporary.write_text(json.dumps({"runs": self.runs}, indent=1) + "\n")
            temporary.replace(self.path)


def result_of(record: Record, run_dir: Path, rung: str, seed: int, overrides: list[str], recipe: dict,
              training: bool) -> dict | None:
    """A finished run's result for this recipe: from its run directory, else from the record. A
    run of another recipe is not this rung's: when training, a finished run directory of another
    recipe is refused (the launcher would resume into it) and a recorded run is trained again."""
    try:
        result = run_result(run_dir)
        if result is not None:
            from launcher.recipe import load_recipe

            ran = what_ran(load_recipe(run_dir / "recipe.yaml"))
    except LauncherError as err:  # a damaged run directory is named and left out, never a traceback
        if training:
            raise SystemExit(f"error: {err}. Move {run_dir} away to train the run again.") from None
        print(f"[ladder] {rung} seed {seed}: left out: {err}", file=sys.stderr)
        result = None
    if result is not None:
        if ran == recipe:
            if record.find(rung, seed, overrides, recipe) != result:
                record.add(rung, seed, overrides, recipe, result)
            return result
        if training:
            raise SystemExit(f"{run_dir} holds a finished run of another recipe than this rung's "
                             f"({differences(ran, recipe)}). Move it away (or give --runs another folder) "
                             "to train the rung again.")
        print(f"[ladder] {rung} seed {seed}: {run_dir} ran another recipe ({differences(ran, recipe)}); "
              "not reported", file=sys.stderr)
    found = record.find(rung, seed, overrides, recipe)
    entry = record.entry(rung, seed)
    if found is None and entry is not None and entry["overrides"] == overrides:
        print(f"[ladder] {rung} seed {seed}: the recorded run was made with another recipe "
              f"({differences(entry.get('recipe') or {}, recipe)}); "
              + ("training it again" if training else "not reported (rerun the ladder to train it)"), file=sys.stderr)
    return found


def expected_recipe(ladder: Ladder, index: int, extra: list[str]) -> dict:
    """What a rung's run does (what_ran), from the ladder's recipe and the run's overrides."""
    from launcher.recipe import load_recipe

    return what_ran(load_recipe(REPO / ladder.recipe, ["data.train=x", "data.val=x"]
                                + run_overrides(ladder, index, extra)))


def data_overrides(name: str, data_dir: Path, src: Path | None, train_images: int | None) -> list[str]:
    """The ladder's shards, written into data_dir when absent. For train_images N the training
    split is written in shards of N images and the runs read the first: the first N images."""
    from launcher.shards import IDX_DEFAULT_SRC
    from launcher.shards import main as write_shards

    info_file = data_dir / "info.json"
    if not info_file.exists():
        args = [name, "--out", str(data_dir)] + (["--shard-size", str(train_images)] if train_images else [])
        if name != "digits":
            shared = REPO.parent / "shared" / "data" / name
            src = src or (shared if shared.is_dir() else IDX_DEFAULT_SRC.get(name))
            args += ["--src", str(src)]
        if write_shards(args) != 0:
            raise SystemExit(f"could not write the {name} shards into {data_dir}")
    info = json.loads(info_file.read_text())
    train = info["train"]
    if train_images is not None:  # train-{000000..000023}.tar -> train-{000000..000000}.tar
        first, last = re.search(r"\{(\d+)\.\.(\d+)\}", train).groups()
        shards = int(last) - int(first) + 1
        if shards != -(-info["num_train"] // train_images):
            raise SystemExit(f"{data_dir} holds {info['num_train']} training images in {shards} shards, not in shards "
                             f"of {train_images} as this ladder trains on the first {train_images}: give --data-dir "
                             "a new folder (the ladder writes its shards there).")
        train = re.sub(r"\{(\d+)\.\.(\d+)\}", f"{{{first}..{first}}}", train)
    return [f"data.train={train}", f"data.val={info['val']}"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=sorted(LADDERS), default="fashion-mnist")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs", type=Path, default=None, help="run directories (default runs/ladder-DATA)")
    parser.add_argument("--data-dir", type=Path, default=None, help="the shards (default data/SOURCE, or "
                        "data/SOURCE-N for a ladder on the first N training images; written if absent)")
    parser.add_argument("--src", type=Path, default=None, help="the IDX files (default ../shared/data/DATA, then "
                        "Debian's /usr/share/datasets/DATA)")
    parser.add_argument("--rungs", type=int, nargs="+", default=None, help="only these rung numbers (0 = baseline)")
    parser.add_argument("--out", type=Path, default=None, help="markdown report; the plot goes next to it (.png)")
    parser.add_argument("--record", type=Path, default=None, help="the finished runs' results (default: --out with "
                        ".json; none without --out)")
    parser.add_argument("--table-only", action="store_true", help="report the finished runs; train nothing")
    parser.add_argument("overrides", nargs="*", help="recipe overrides for every run (e.g. train.epochs=1, "
                        "for a quick look)")
    args = parser.parse_args()
    ladder = LADDERS[args.data]
    runs = args.runs or REPO / "runs" / f"ladder-{args.data}"
    rung_numbers = args.rungs if args.rungs is not None else list(range(len(ladder.rungs)))
    record = Record(args.record or (args.out.with_suffix(".json") if args.out is not None else None))
    if not args.table_only:
        from launcher.loop import train
        from launcher.recipe import load_recipe

        source = ladder.source or args.data
        default_dir = REPO / "data" / (f"{source}-{ladder.train_images}" if ladder.train_images else source)
        data = data_overrides(source, args.data_dir or default_dir, args.src, ladder.train_images)
        for seed in args.seeds:
            for index in rung_numbers:
                name = slug(index, ladder.rungs[index])
                run_dir = runs / name / f"seed{seed}"
                overrides = run_overrides(ladder, index, args.overrides)
                expected = expected_recipe(ladder, index, args.overrides)
                if result_of(record, run_dir, name, seed, overrides + ladder.setting(), expected, True) is not None:
                    continue
                recipe = load_recipe(REPO / ladder.recipe, data + overrides + [
                    "run.progress=false", f"seed={seed}", f"run.dir={run_dir}"])
                start, cpu_start = time.perf_counter(), time.process_time()
                train(recipe)  # resumes from run_dir's checkpoint when an earlier ladder was stopped in it
                timing = run_dir / "ladder_time.json"
                # Wall and process CPU time (all threads; the recipe's loader runs in the process), summed
                # over the sittings a run took. The CPU time is the one compared: it does not grow when
                # something else shares the machine.
                before = json.loads(timing.read_text()) if timing.exists() else {}
                timing.write_text(json.dumps({
                    "seconds": before.get("seconds", 0.0) + time.perf_counter() - start,
                    "cpu_seconds": before.get("cpu_seconds", 0.0) + time.process_time() - cpu_start}) + "\n")
                result = result_of(record, run_dir, name, seed, overrides + ladder.setting(), expected, True)
                print(f"[ladder] {ladder.rungs[index].name:20s} seed {seed}: {result['metric']} "
                      f"{result['top1']:.4f} in {result['seconds']:.0f} s", flush=True)
    return report(ladder, runs, record, rung_numbers, args.seeds, args.overrides, args.out)


def run_overrides(ladder: Ladder, index: int, extra: list[str]) -> list[str]:
    """What a run adds to the recipe, besides its data, seed and run directory."""
    return ladder.base + rung_overrides(ladder, index) + list(extra)


def report(ladder: Ladder, runs: Path, record: Record, rung_numbers: list[int], seeds: list[int],
           overrides: list[str], out: Path | None) -> int:
    rows = []
    for index in rung_numbers:
        rung = ladder.rungs[index]
        name = slug(index, rung)
        expected = expected_recipe(ladder, index, overrides)
        results = [r for seed in seeds
                   if (r := result_of(record, runs / name / f"seed{seed}", name, seed,
                                      run_overrides(ladder, index, overrides) + ladder.setting(), expected,
                                      False)) is not None]
        if results:
            rows.append((rung, results))
    if not rows:
        print(f"no finished runs under {runs}", file=sys.stderr)
        return 1

    def mean_std(values: list[float]) -> str:
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.2f} ± {std:.2f}"

    base_top1 = statistics.mean(100 * r["top1"] for r in rows[0][1]) if rows[0][0] is ladder.rungs[0] else None
    base_times = [r["cpu_seconds"] for r in rows[0][1] if r.get("cpu_seconds")]
    base_time = statistics.mean(base_times) if base_top1 is not None and base_times else None
    lines = [f"# The practitioners' ladder: {ladder.about}", "",
             "Rungs marked + add one trick to the rung above (cumulative); the others are tried alone on the",
             "baseline. Top-1 is the final validation accuracy of the model one would ship (the metric",
             "column: EMA and TTA where they are on), mean ± standard deviation over the seeds.", "",
             "| rung | adds | metric | top-1 % | plain model top-1 % | vs baseline (points) | seeds | CPU time per run | "
             "vs baseline |", "|---|---|---|---|---|---|---|---|---|"]
    for rung, results in rows:
        top1 = [100 * r["top1"] for r in results]
        secs = [r["cpu_seconds"] for r in results if r.get("cpu_seconds")]
        delta = f"{statistics.mean(top1) - base_top1:+.2f}" if base_top1 is not None else "-"
        time_cell = f"{statistics.mean(secs):.0f} s" if secs else "-"
        ratio = f"{statistics.mean(secs) / base_time:.2f}x" if secs and base_time else "-"
        lines.append(f"| {rung.name} | {rung.adds} | {results[0]['metric']} | {mean_std(top1)} | "
                     f"{mean_std([100 * r['plain_top1'] for r in results])} | {delta} | {len(results)} | {time_cell} | "
                     f"{ratio} |")
    lines += verdict(ladder, rows)
    lines += ["", "CPU time: the training process's CPU seconds (all its threads); a run stopped and resumed counts its "
              "last sitting only. It is no clean cost measure on a shared machine either (torch's threads spin while "
              "they wait, and caches are shared): runs that shared the machine cost more. For the cost of each trick "
              "see plugin_cost_cpu.md."]
    import torch

    from launcher.recipe import load_recipe

    base = load_recipe(REPO / ladder.recipe, ladder.base + ["data.train=x", "data.val=x", *overrides])
    lines += ["", f"Every run: `{ladder.recipe}` with {' '.join(f'`{o}`' for o in ladder.base + overrides)}: "
              f"{base.model.name}, "
              f"{base.train.epochs} epochs, batch {base.data.batch_size}, {base.optimizer.name} lr {base.optimizer.lr}, "
              f"{base.schedule.name} schedule. Machine: {torch.get_num_threads()} CPU threads, torch "
              f"{torch.__version__}. Run directories: `{runs}`"
              + (f"; every finished run's result, overrides and resolved recipe: `{record.path.name}`." if record.path else ".")]
    if ladder.references:
        lines += ["", "Published references (full-length GPU training, for scale):", "", *ladder.references]
    if out is not None:
        plot(rows, out.with_suffix(".png"), ladder.about)
        lines += ["", f"![top-1 per rung]({out.with_suffix('.png').name})"]
    emit(lines, out)
    return 0


def verdict(ladder: Ladder, rows) -> list[str]:
    """Whether the top of the ladder beats its baseline by more than 2 standard deviations (the
    larger of the two rungs' standard deviations over seeds), when both have 2 seeds or more."""
    shown = {rung.name: results for rung, results in rows}
    top = [r for r in ladder.rungs if not r.alone][-1]
    base, last = shown.get(ladder.rungs[0].name, []), shown.get(top.name, [])
    if len(base) < 2 or len(last) < 2:
        return []
    a, b = [100 * r["top1"] for r in base], [100 * r["top1"] for r in last]
    gain, spread = statistics.mean(b) - statistics.mean(a), max(statistics.stdev(a), statistics.stdev(b))
    beats = gain > 2 * spread
    return ["", f"The top of the ladder ({top.name}) against the baseline: {gain:+.2f} points, "
            f"{gain / spread if spread else float('inf'):.1f} standard deviations (the larger of the two rungs', "
            f"{spread:.2f}): {'more' if beats else 'not more'} than 2 ({len(a)} and {len(b)} seeds)."]


def plot(rows, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [rung.name for rung, _ in rows]
    means = [statistics.mean(100 * r["top1"] for r in results) for _, results in rows]
    stds = [statistics.stdev([100 * r["top1"] for r in results]) if len(results) > 1 else 0.0 for _, results in rows]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    # Points with error bars, not bars: the axis does not start at 0, and a bar's length would lie.
    for x, ((rung, _), mean, std) in enumerate(zip(rows, means, stds)):
        ax.errorbar([x], [mean], yerr=[std], fmt="s" if rung.alone else "o", capsize=5, markersize=7,
                    color="tab:gray" if rung.alone else "tab:blue")
    ax.plot([x for x, (rung, _) in enumerate(rows) if not rung.alone],
            [m for m, (rung, _) in zip(means, rows) if not rung.alone], color="tab:blue", alpha=0.4)
    ax.grid(axis="y", alpha=0.3)
    ax.set_xticks(range(len(rows)), names, rotation=25, ha="right")
    low = min(m - s for m, s in zip(means, stds))
    ax.set_ylim(max(0.0, low - 1.0), min(100.0, max(m + s for m, s in zip(means, stds)) + 0.5))
    ax.set_ylabel("val top-1 % (mean ± std over seeds)")
    ax.set_title(f"The practitioners' ladder: {title.split(' (')[0]} (blue: cumulative, grey: alone on the baseline)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
