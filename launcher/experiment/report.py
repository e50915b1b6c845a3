"""An experiment's table, with honest statistics: for each rung (and grid combination) the mean
and standard deviation over seeds, a 95% confidence interval (Student t), Welch's t-test against
the baseline and against the rung below, and a flag when a difference is inside the noise. Also as
CSV and JSON, and a plot with error bars and the published references. Trains nothing.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from launcher.experiment.spec import Experiment, combo_name, percent

ALPHA = 0.05  # a difference with Welch's p at or above this is reported as inside the noise


@dataclass
class Row:
    """One line of the table: a rung with one grid combination, over its finished seeds."""

    rung_index: int
    rung: str
    about: str
    alone: bool
    combo: dict[str, Any]
    seeds: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)  # the metric, in the table's unit
    plain: list[float] = field(default_factory=list)  # val/top1 of the plain model, same unit
    metrics: list[str] = field(default_factory=list)  # the key each value was read from
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    # Filled by compare():
    mean: float = math.nan
    std: float = math.nan
    ci95: float = math.nan  # half-width
    vs_baseline: Optional[float] = None
    p_baseline: Optional[float] = None
    vs_below: Optional[float] = None
    p_below: Optional[float] = None
    below: Optional[str] = None

    @property
    def label(self) -> str:
        return self.rung + (f" ({combo_name(self.combo)})" if self.combo else "")


# The t distribution from scipy.special (its quantile and CDF): scipy.stats gives the same numbers
# (tests/test_experiment.py compares them) but takes 2 s to import, most of a report's time.


def summary(values: list[float]) -> tuple[float, float, float]:
    """(mean, sample standard deviation, half-width of the 95% Student t interval); NaN where n is
    too small (std and interval need 2 values)."""
    from scipy.special import stdtrit

    n = len(values)
    mean = statistics.fmean(values) if values else math.nan
    if n < 2:
        return mean, math.nan, math.nan
    std = statistics.stdev(values)
    return mean, std, float(stdtrit(n - 1, 0.975) * std / math.sqrt(n))


def welch(a: list[float], b: list[float]) -> Optional[float]:
    """Welch's t-test p-value (two-sided) of b against a; None with fewer than 2 values a side.
    Two samples without any spread that differ are certainly different (p 0); equal ones, not (1)."""
    from scipy.special import stdtr

    if len(a) < 2 or len(b) < 2:
        return None
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if va + vb == 0:
        return 1.0 if statistics.fmean(a) == statistics.fmean(b) else 0.0
    t = (statistics.fmean(b) - statistics.fmean(a)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))  # Welch-Satterthwaite
    return float(2 * stdtr(df, -abs(t)))


def build_rows(experiment: Experiment, results: dict[str, dict], trials) -> list[Row]:
    """Rows in the experiment's order (rungs, then grid combinations) with each finished trial's
    result; rows without any finished trial are left out."""
    scale = 100.0 if percent(experiment.spec.metric) else 1.0
    rows: dict[tuple[str, str], Row] = {}
    spec = experiment.spec
    for trial in sorted(trials, key=lambda t: (t.rung_index, combo_name(t.combo), t.seed)):
        rung = spec.rungs[trial.rung_index]
        row = rows.setdefault(trial.group, Row(trial.rung_index, rung.name, rung.about, rung.alone, trial.combo))
        result = results.get(trial.name)
        if result is None:
            continue
        row.seeds.append(trial.seed)
        row.values.append(scale * result["top1"])
        row.metrics.append(result["metric"])
        if result.get("plain_top1") is not None:
            row.plain.append(scale * result["plain_top1"])
        if result.get("seconds") is not None:
            row.seconds.append(result["seconds"])
        if result.get("cpu_seconds") is not None:
            row.cpu_seconds.append(result["cpu_seconds"])
    kept = [row for row in rows.values() if row.values]
    compare(experiment, kept)
    return kept


def compare(experiment: Experiment, rows: list[Row]) -> None:
    by_key = {(row.rung_index, combo_name(row.combo)): row for row in rows}
    for row in rows:
        row.mean, row.std, row.ci95 = summary(row.values)
        key = combo_name(row.combo)
        baseline = by_key.get((0, key))
        if baseline is not None and baseline is not row:
            row.vs_baseline = row.mean - baseline.mean
            row.p_baseline = welch(baseline.values, row.values)
        below_index = experiment.below(row.rung_index)
        below = by_key.get((below_index, key)) if below_index is not None else None
        if below is not None and below_index != 0:  # against the baseline already shown
            row.below = below.rung
            row.vs_below = row.mean - below.mean
            row.p_below = welch(below.values, row.values)


def _number(value: Optional[float], digits: int = 2, sign: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _p(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def _difference(delta: Optional[float], p: Optional[float]) -> str:
    """'+2.81 (p 0.003)' or '-0.10 (p 0.612, noise)'."""
    if delta is None:
        return "-"
    noise = p is not None and p >= ALPHA
    return f"{delta:+.2f} (p {_p(p)}{', noise' if noise else ''})" if p is not None else f"{delta:+.2f}"


def markdown(experiment: Experiment, rows: list[Row], pending: int, left_out: list[str],
             plot_name: Optional[str]) -> list[str]:
    spec = experiment.spec
    unit = "%" if percent(spec.metric) else ""
    title = spec.title or f"Experiment {experiment.name}"
    lines = [f"# {title}", ""]
    if spec.about:
        lines += [spec.about, ""]
    lines += [
        "Rungs marked + add their overrides to the rung above (cumulative); the others are tried alone on the "
        "baseline. The number is " + ("the final evaluation of the model one would ship (the metric column: EMA and "
                                       "TTA where they are on)" if spec.metric == "shipped"
                                       else f"the final {spec.metric}") + ", mean ± standard deviation over the "
        "seeds, with the 95% confidence interval of the mean (Student t). A difference is the change of the mean, "
        f"with Welch's t-test p-value; \"noise\" marks p >= {ALPHA} (the seeds do not tell it apart).", "",
        f"| rung | adds | metric | {spec.metric if spec.metric != 'shipped' else 'top-1'} {unit} | 95% CI | seeds "
        "| vs baseline | vs rung below | plain model | time per trial |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ci = f"{row.mean - row.ci95:.2f} - {row.mean + row.ci95:.2f}" if not math.isnan(row.ci95) else "-"
        metric = ", ".join(sorted(set(row.metrics)))
        plain = (f"{statistics.fmean(row.plain):.2f}" if row.plain and set(row.metrics) != {"val/top1"} else "-")
        seconds = f"{statistics.fmean(row.seconds):.0f} s" if row.seconds else "-"
        lines.append(f"| {row.label} | {row.about} | {metric} | {row.mean:.2f} ± {_number(row.std)} | {ci} | "
                     f"{len(row.values)} | {_difference(row.vs_baseline, row.p_baseline)} | "
                     f"{_difference(row.vs_below, row.p_below)} | {plain} | {seconds} |")
    lines += verdict(experiment, rows)
    if pending or left_out:
        lines += ["", f"Not in the table: {pending} trial(s) not finished"
                  + (f"; left out: {'; '.join(left_out)}" if left_out else "") + "."]
    base = experiment.spec.overrides + experiment.extra
    lines += ["", f"Every trial: `{experiment.recipe}`" + (f" with {' '.join(f'`{o}`' for o in base)}" if base else "")
              + f"; seeds {', '.join(map(str, spec.seeds))}. Experiment file: `{experiment.path}`; run directories: "
              f"`{experiment.dir}`; record: `{experiment.record}`."]
    if spec.references:
        lines += ["", "Published references (for scale, not the same setting):", "", "| reference | value |", "|---|---|"]
        lines += [f"| {ref.name} | {ref.value} |" for ref in spec.references]
    if plot_name:
        lines += ["", f"![{'top-1' if spec.metric == 'shipped' else spec.metric} per rung]({plot_name})"]
    return lines


def verdict(experiment: Experiment, rows: list[Row]) -> list[str]:
    """Whether the top of the ladder (the last cumulative rung) beats the baseline beyond the noise."""
    spec = experiment.spec
    top = max((i for i, r in enumerate(spec.rungs) if not r.alone), default=0)
    if top == 0:
        return []
    lines = []
    baselines = {combo_name(row.combo): row for row in rows if row.rung_index == 0}
    for row in rows:
        if row.rung_index != top or row.p_baseline is None:
            continue
        beyond = row.p_baseline < ALPHA
        base = baselines[combo_name(row.combo)]
        lines.append(f"The top of the ladder ({row.label}) against the baseline: {row.vs_baseline:+.2f} points, "
                     f"Welch's p = {_p(row.p_baseline)} ({len(base.values)} and {len(row.values)} seeds): "
                     f"{'beyond' if beyond else 'inside'} the noise.")
    return [""] + lines if lines else []


def as_json(rows: list[Row]) -> list[dict]:
    out = []
    for row in rows:
        item = asdict(row)
        item["label"] = row.label
        out.append({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in item.items()})
    return out


CSV_FIELDS = ("rung", "combo", "alone", "seeds", "mean", "std", "ci95", "vs_baseline", "p_baseline", "below",
              "vs_below", "p_below")


def write_csv(rows: list[Row], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for item in as_json(rows):
            writer.writerow({k: (combo_name(item[k]) if k == "combo" else
                                 len(item[k]) if k == "seeds" else item[k]) for k in CSV_FIELDS})


def plot(experiment: Experiment, rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = experiment.spec
    fig, ax = plt.subplots(figsize=(max(7.0, 0.9 * len(rows) + 3), 4.5))
    # Points with error bars (the 95% interval; the std where only one seed), not bars: the axis does
    # not start at 0, and a bar's length would lie.
    for x, row in enumerate(rows):
        err = row.ci95 if not math.isnan(row.ci95) else 0.0
        ax.errorbar([x], [row.mean], yerr=[err], fmt="s" if row.alone else "o", capsize=5, markersize=7,
                    color="tab:gray" if row.alone else "tab:blue")
    cumulative = [(x, row.mean) for x, row in enumerate(rows) if not row.alone]
    if len(cumulative) > 1:
        ax.plot(*zip(*cumulative), color="tab:blue", alpha=0.4)
    lows = [row.mean - (0 if math.isnan(row.ci95) else row.ci95) for row in rows]
    highs = [row.mean + (0 if math.isnan(row.ci95) else row.ci95) for row in rows]
    for ref in spec.references:
        if min(lows) - 3 <= ref.value <= max(highs) + 3:  # only the references on this scale
            ax.axhline(ref.value, color="tab:green", linestyle="--", alpha=0.6)
            ax.annotate(ref.name, (len(rows) - 0.5, ref.value), fontsize=7, ha="right", va="bottom",
                        color="tab:green")
            lows.append(ref.value)
            highs.append(ref.value)
    ax.set_ylim(min(lows) - 0.5, max(highs) + 0.5)
    ax.grid(axis="y", alpha=0.3)
    ax.set_xticks(range(len(rows)), [row.label for row in rows], rotation=25, ha="right")
    unit = " %" if percent(spec.metric) else ""
    ax.set_ylabel(f"{spec.metric if spec.metric != 'shipped' else 'val top-1'}{unit} (mean, 95% CI over seeds)")
    ax.set_title((spec.title or experiment.name) + " (blue: cumulative, grey: alone on the baseline)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(experiment: Experiment, rows: list[Row], pending: int, left_out: list[str],
                 out: Path, draw: bool = True) -> list[str]:
    """report.md (the table), report.csv, report.table.json and report.png beside it; returns the lines.
    (.table.json: a record may be named report.json beside it.)"""
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    if draw and rows:
        plot(experiment, rows, png)
    lines = markdown(experiment, rows, pending, left_out, png.name if draw and rows else None)
    out.write_text("\n".join(lines) + "\n")
    write_csv(rows, out.with_suffix(".csv"))
    out.with_suffix(".table.json").write_text(json.dumps({"experiment": str(experiment.path), "metric": experiment.spec.metric,
                                                    "rows": as_json(rows), "pending": pending,
                                                    "left_out": left_out}, indent=1) + "\n")
    return lines
