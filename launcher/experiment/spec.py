"""The experiment file: a recipe, the overrides that make it the baseline, a ladder of rungs, a
grid, seeds and an optional search, validated as strictly as a recipe (unknown keys with the
nearest valid one, wrong types), and expanded into trials: ordinary run directories.

    recipe: recipes/fashion_mnist.yaml
    dir: runs/fashion_mnist_ladder        # default runs/<experiment file name>
    overrides: [model.name=wrn10_2]       # the baseline, applied to every trial
    seeds: [0, 1, 2]
    metric: shipped                       # or a logged key: val/top1, val_ema/top1, ...
    rungs:                                # cumulative: each adds its overrides to the rung above
      - {name: baseline}
      - {name: + SAM, overrides: ["plugins.sam={rho: 0.05}"]}
      - {name: mixup alone, overrides: ["plugins.mixup={}"], alone: true}   # on the baseline only
    grid: {optimizer.lr: [0.05, 0.1]}     # every rung x every combination
    references: [{name: WRN-28-10 + RE (Zhong et al.), value: 96.35}]
"""

from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field, ValidationError, field_validator, model_validator

from launcher.errors import LauncherError, did_you_mean
from launcher.config.schema import StrictModel, explain_validation
from launcher.config.yamlfile import read_mapping_file

# metric: shipped takes, in each trial's last evaluation, the first of these it logged: the model
# one would ship (EMA and TTA where the recipe has them on).
SHIPPED = ("val_ema_tta/top1", "val_ema/top1", "val_tta/top1", "val/top1")


class RungSpec(StrictModel):
    name: str = Field(min_length=1, description="the rung's name in the table")
    about: str = Field("", description="what the rung adds, in words (the table's second column)")
    overrides: list[str] = Field(default_factory=list, description="recipe overrides this rung adds")
    alone: bool = Field(False, description="on the baseline only, not on the rungs above it")


class ReferenceSpec(StrictModel):
    name: str = Field(min_length=1)
    value: float = Field(description="the published number, in the table's unit (percent for top-1)")


class ParameterSpec(StrictModel):
    """One searched recipe key: a distribution Optuna samples."""

    type: Literal["float", "int", "categorical"] = "float"
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = Field(False, description="sample on a log scale (learning rates, weight decay)")
    step: Optional[float] = None
    choices: Optional[list[Any]] = None

    @model_validator(mode="after")
    def _a_distribution(self):
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical parameter needs choices: [...]")
            if self.low is not None or self.high is not None:
                raise ValueError("a categorical parameter takes choices, not low/high")
            return self
        if self.low is None or self.high is None or not self.low < self.high:
            raise ValueError("give low < high, e.g. {type: float, low: 1e-3, high: 1.0, log: true}")
        if self.log and self.low <= 0:
            raise ValueError("log: true needs low > 0")
        if self.choices is not None:
            raise ValueError(f"a {self.type} parameter takes low/high, not choices")
        return self


class SearchSpec(StrictModel):
    """Optuna (pip install '.[search]'): `trials` runs of the baseline (the first rung), each with
    parameters sampled from `parameters`, pruned on the metric after each evaluation."""

    trials: int = Field(gt=0, description="how many runs the search makes")
    parameters: dict[str, ParameterSpec] = Field(min_length=1, description="recipe key -> distribution")
    sampler: Literal["tpe", "random"] = "tpe"
    pruner: Literal["median", "successive_halving", "none"] = "median"
    direction: Literal["maximize", "minimize"] = "maximize"
    seed: int = Field(0, description="the sampler's seed (the trials' seed is the experiment's first)")
    startup_trials: int = Field(5, ge=0, description="median pruner: trials that are never pruned, to learn from")
    enqueue: list[dict[str, Any]] = Field(default_factory=list, description="parameter sets to try first (e.g. "
                                                                            "the recipe's own values), in order")
    storage: Literal["sqlite", "journal"] = Field(
        "sqlite", description="where the study lives, beside the experiment: sqlite (Optuna's RDB storage, one "
                              "machine) or journal (Optuna's journal file, for a shared file system)")

    @model_validator(mode="after")
    def _enqueued_are_parameters(self):
        for point in self.enqueue:
            unknown = sorted(set(point) - set(self.parameters))
            if unknown:
                raise ValueError(f"search.enqueue names {unknown[0]!r}, which is not a searched parameter "
                                 f"({', '.join(self.parameters)})")
        return self


class ExperimentSpec(StrictModel):
    recipe: str = Field(description="the recipe every trial starts from (relative to the experiment file's "
                                    "folder, or to the working directory)")
    dir: Optional[str] = Field(None, description="where the trials' run directories go; default "
                                                 "runs/<experiment file name>")
    record: Optional[str] = Field(None, description="the finished trials' results (JSON); default <dir>/record.json")
    report: Optional[str] = Field(None, description="where `report` writes (markdown; CSV, JSON and the plot "
                                                    "beside it); default <dir>/report/report.md")
    title: Optional[str] = Field(None, description="the report's title")
    about: str = Field("", description="a sentence on the setting, under the title")
    overrides: list[str] = Field(default_factory=list, description="applied to every trial: the baseline")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    metric: str = Field("shipped", description="the table's number: a key every trial logs at evaluation "
                                               "(val/top1, val_ema/top1, ...), or shipped: the first of "
                                               + ", ".join(SHIPPED) + " a trial logs")
    rungs: list[RungSpec] = Field(default_factory=lambda: [RungSpec(name="baseline")], min_length=1)
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="recipe key -> values: every rung runs "
                                                                         "every combination")
    search: Optional[SearchSpec] = None
    references: list[ReferenceSpec] = Field(default_factory=list)

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, value):
        if len(set(value)) != len(value):
            raise ValueError(f"seed {next(s for s in value if value.count(s) > 1)} is listed twice")
        return value

    @field_validator("rungs")
    @classmethod
    def _distinct_rungs(cls, value):
        names = [r.name for r in value]
        twice = next((n for n in names if names.count(n) > 1), None)
        if twice is not None:
            raise ValueError(f"the rung name {twice!r} is used twice: each rung needs its own name")
        if value[0].alone:
            raise ValueError(f"the first rung ({value[0].name!r}) is the baseline: it cannot be alone")
        return value

    @field_validator("grid")
    @classmethod
    def _grid_values(cls, value):
        for key, values in value.items():
            if not values:
                raise ValueError(f"grid key {key!r} has no values")
            if len(values) != len({repr(v) for v in values}):
                raise ValueError(f"grid key {key!r} lists a value twice")
        return value


@dataclass
class Trial:
    """One run of the experiment: a rung, a grid combination (or a search trial) and a seed."""

    rung_index: int
    rung: str  # the rung's name
    slug: str  # its folder name, NN-words
    combo: dict[str, Any]  # grid key -> value
    seed: int
    run_dir: Path
    name: str  # rung[/combination]/seed-S: the run directory relative to the experiment's folder
    overrides: list[str]  # what the trial adds to the recipe, besides its seed and run directory
    search_number: Optional[int] = None

    @property
    def group(self) -> tuple[str, str]:
        """(rung slug, combination name): the trials of one table row."""
        return self.slug, combo_name(self.combo)


@dataclass
class Experiment:
    path: Path
    spec: ExperimentSpec
    recipe: Path
    dir: Path
    record: Path
    report: Path
    extra: list[str] = field(default_factory=list)  # the command line's overrides, for every trial

    @property
    def name(self) -> str:
        return self.path.stem

    def rung_overrides(self, index: int) -> list[str]:
        """A rung's overrides: its own on the baseline when alone, else every rung up to it."""
        rung = self.spec.rungs[index]
        if rung.alone:
            return list(rung.overrides)
        return [o for r in self.spec.rungs[:index + 1] if not r.alone for o in r.overrides]

    def below(self, index: int) -> Optional[int]:
        """The rung a cumulative rung adds to (None for the baseline and for rungs alone)."""
        if index == 0 or self.spec.rungs[index].alone:
            return None
        return max(i for i in range(index) if not self.spec.rungs[i].alone)

    def combos(self) -> list[dict[str, Any]]:
        keys = list(self.spec.grid)
        return [dict(zip(keys, values)) for values in itertools.product(*(self.spec.grid[k] for k in keys))]

    def trials(self, seeds: Optional[list[int]] = None, rungs: Optional[list[str]] = None) -> list[Trial]:
        """Every (rung, combination, seed), seeds going round the rungs: seed 0 of every rung and
        combination first, so an experiment stopped early still has every rung. `seeds` and
        `rungs` (names or numbers) select some of them."""
        chosen = self.select_rungs(rungs)
        unknown = sorted(set(seeds or []) - set(self.spec.seeds))
        if unknown:
            raise LauncherError(f"--seeds {unknown[0]}: the experiment's seeds are {self.spec.seeds}.")
        out = []
        for seed in self.spec.seeds:
            if seeds and seed not in seeds:
                continue
            for index, rung in enumerate(self.spec.rungs):
                if index not in chosen:
                    continue
                for combo in self.combos():
                    name = "/".join([slug(index, rung.name), *([combo_name(combo)] if combo else []),
                                     f"seed-{seed}"])
                    out.append(Trial(index, rung.name, slug(index, rung.name), combo, seed, self.dir / name, name,
                                     self.trial_overrides(index, combo)))
        return out

    def select_rungs(self, rungs: Optional[list[str]]) -> set[int]:
        names = [r.name for r in self.spec.rungs]
        if not rungs:
            return set(range(len(names)))
        chosen = set()
        for item in rungs:
            if item.isdigit() and int(item) < len(names):
                chosen.add(int(item))
            elif item in names:
                chosen.add(names.index(item))
            else:
                raise LauncherError(f"--rungs {item!r}: no such rung.{did_you_mean(item, names)} Rungs: "
                                    + ", ".join(f"{i} {n!r}" for i, n in enumerate(names)))
        return chosen

    def trial_overrides(self, index: int, combo: dict[str, Any]) -> list[str]:
        return [*self.spec.overrides, *self.rung_overrides(index), *(f"{k}={_yaml_value(v)}" for k, v in combo.items()),
                *self.extra]

    def trial_recipe(self, trial: Trial):
        """The trial's resolved recipe, as the trial will train it; run.experiment says which
        trial it is (trackers group by it)."""
        import json

        from launcher.config.load import load_recipe

        about = {"name": self.name, "trial": trial.name, "rung": trial.rung, "seed": trial.seed, "combo": trial.combo}
        return load_recipe(self.recipe, [*trial.overrides, f"seed={trial.seed}", f"run.dir={trial.run_dir}",
                                         "run.progress=false", f"run.experiment={json.dumps(about)}"])


def slug(index: int, name: str) -> str:
    words = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"{index:02d}-{words or 'rung'}"


def combo_name(combo: dict[str, Any]) -> str:
    """optimizer.lr=0.05,data.batch_size=64 as a folder name (no slashes or spaces)."""
    return ",".join(f"{k}={re.sub(r'[^A-Za-z0-9._+-]+', '_', _yaml_value(v))}" for k, v in combo.items())


def _yaml_value(value: Any) -> str:
    """A grid value as an override's right-hand side (YAML flow style for lists and mappings)."""
    import yaml

    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True, width=10 ** 6).strip().removesuffix("...").strip()


def load_experiment(path: str | Path, extra: list[str] = ()) -> Experiment:
    """Read and validate an experiment file (not yet its trials' recipes: check_trials)."""
    path = Path(path)
    raw = read_mapping_file(path, "Experiment", "experiments/fashion_mnist_ladder.yaml",
                            "keys (recipe:, seeds:, rungs:, ...)")
    try:
        spec = ExperimentSpec.model_validate(raw)
    except ValidationError as err:
        raise LauncherError(explain_validation(err, ExperimentSpec, f"Experiment file {path}")) from None
    for item in extra:
        if "=" not in item and not item.startswith("~"):
            raise LauncherError(f"'{item}' is not an override (key=value or ~key) for every trial.")
    recipe = _resolve_path(spec.recipe, path)
    if not recipe.is_file():
        raise LauncherError(f"{path}: recipe '{spec.recipe}' does not exist (looked in {path.parent} and the "
                            "working directory).")
    folder = Path(spec.dir) if spec.dir else Path("runs") / path.stem
    record = Path(spec.record) if spec.record else folder / "record.json"
    report = Path(spec.report) if spec.report else folder / "report" / "report.md"
    if extra:
        # Overrides from the command line make a variant (a quick look with train.max_steps=2, a
        # change to try): its trials, record and report live apart, so it never replaces the
        # experiment's own results.
        folder = folder / f"variant-{hashlib.sha256(chr(10).join(extra).encode()).hexdigest()[:8]}"
        record, report = folder / "record.json", folder / "report" / "report.md"
    return Experiment(path, spec, recipe, folder, record, report, list(extra))


def _resolve_path(value: str, experiment_file: Path) -> Path:
    """A path in the experiment file: as given (from the working directory), else next to the file."""
    given = Path(value)
    if given.is_absolute() or given.exists():
        return given
    beside = experiment_file.parent / given
    return beside if beside.exists() else given


def check_trials(experiment: Experiment, trials: list[Trial]) -> dict[tuple[str, str], Any]:
    """Resolve and check every (rung, combination) as `--check` does, before anything trains: the
    recipe with the trial's overrides validates, its model exists, its shards are there. A rung
    whose overrides the recipe refuses is named with the error. Returns each group's recipe."""
    from launcher.preflight import preflight

    recipes: dict[tuple[str, str], Any] = {}
    checked: set[tuple[str, str, str]] = set()
    for trial in trials:
        if trial.group in recipes:
            continue
        where = f"rung {trial.rung!r}" + (f" ({combo_name(trial.combo)})" if trial.combo else "")
        try:
            recipe = experiment.trial_recipe(trial)
            key = (recipe.model.name, recipe.data.train, str(recipe.data.val))
            if key not in checked:
                preflight(recipe)
                checked.add(key)
        except LauncherError as err:
            raise LauncherError(f"Experiment {experiment.path}: {where} cannot run: {err}") from None
        recipes[trial.group] = recipe
    return recipes


def metric_of(spec: ExperimentSpec) -> Optional[str]:
    """The key to read, or None for 'shipped' (each trial's first of SHIPPED)."""
    return None if spec.metric == "shipped" else spec.metric


def percent(metric: str) -> bool:
    """Accuracies (top-k) are shown in percent."""
    return bool(re.search(r"top\d+$", metric)) or metric == "shipped"

