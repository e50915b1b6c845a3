"""Every command shown in README.md, docs/*.md and slurm/README.md is run by a test, with cheap settings,
so the documentation cannot drift from the code.

README_COMMANDS lists each command as it appears (comments stripped). A command is either run
here, in a fresh working directory that holds the shipped recipes and the data the README's
own commands write, or it names the test that already runs it (checked to exist). A command
added to a README without an entry here fails test_every_readme_command_has_a_test."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, free_port, run_cli

READMES = ("README.md", "slurm/README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md")))
CHEAP = ["train.max_steps=2", "run.progress=false"]

# command -> ("here", what the test below does) or ("test", "tests/FILE.py::test_name")
README_COMMANDS = {
    "accelerate launch -m launcher recipes/wrn.yaml [key=value ...]": ("test", "tests/test_readme_commands.py::test_the_launch_commands_run"),
    "accelerate launch -m launcher recipes/wrn.yaml": ("test", "tests/test_readme_commands.py::test_the_launch_commands_run"),
    "make demo": ("test", "tests/test_readme_commands.py::test_make_demo_runs"),
    "make test": ("test", "the whole suite: .ci/run runs exactly this command"),
    "python -m launcher recipes/digits.yaml": ("here", "quick start"),
    "python -m launcher recipes/fashion_mnist.yaml": ("test", "tests/test_recipes_run.py::test_fashion_mnist_recipes_run_on_idx_written_shards"),
    "accelerate launch --multi_gpu --num_processes 2 -m launcher recipes/digits.yaml train.epochs=3 data.batch_size=32": ("here", "two processes"),
    "python -m launcher --check recipes/wrn.yaml model.name=wrn16_4": ("here", "launch commands"),
    "python -m launcher --list-plugins": ("test", "tests/test_cli.py::test_list_plugins_command"),
    "python -m launcher.lr_find recipes/digits.yaml [--steps 100]": ("here", "quick start"),
    "python -m launcher.report runs/digits": ("here", "quick start"),
    "python -m launcher.evaluate runs/digits [--weights ema]": ("here", "quick start"),
    "python -m launcher.export runs/digits [--format torchscript]": ("test", "tests/test_evaluate.py::test_export_gives_a_timm_folder_and_torchscript_that_compute_the_same"),
    "python -m launcher.export runs/digits --format onnx": ("test", "tests/test_evaluate.py::test_onnx_export_computes_the_same_logits_in_onnxruntime"),
    "python -m launcher.evaluate runs/digits --tta": ("test", "tests/test_evaluate.py::test_tta_numbers_equal_the_loops_and_tta_can_be_added_afterwards"),
    "python -m launcher.predict runs/digits photos/ --out preds.csv": ("test", "tests/test_evaluate.py::test_predict_classifies_shards_and_image_files_alike"),
    "python -m launcher.slurm submit recipes/wrn.yaml --nodes 2 --gpus-per-node 8 --time 24:00:00": ("here", "dry run"),
    "python -m launcher.slurm submit recipes/wrn.yaml --nodes 2 --gpus-per-node 8 --time 24:00:00 --partition gpu [key=value ...]": ("here", "dry run"),
    "python -m launcher.slurm submit recipes/wrn.yaml --dry-run": ("here", "dry run"),
    "python -m launcher.shards digits --out data/digits": ("here", "the working directory's data"),
    "python -m launcher.shards cifar100 --src DIR/cifar-100-python --out data/cifar100": ("test", "tests/test_data.py::test_cifar100_source_from_the_python_pickles"),
    "python -m launcher.shards cifar10 --src DIR/cifar-10-batches-py --out data/cifar10": ("test", "tests/test_data.py::test_cifar10_source_from_the_python_pickles"),
    "python -m launcher.shards fashion-mnist --src DIR --out data/fashion-mnist": ("test", "tests/test_data.py::test_mnist_family_sources_from_their_idx_files"),
    "python -m launcher.shards imagefolder --src DIR --out data/mine": ("test", "tests/test_data.py::test_imagefolder_source"),
    "python -m launcher.shards npz --src arrays.npz --out data/mine": ("test", "tests/test_data.py::test_npz_source"),
    "python -m launcher.shards index 'data/other/train-{000000..000999}.tar'": ("test", "tests/test_data.py::test_shards_of_other_tools_are_indexed_by_the_index_command_or_once_on_first_use"),
    "python -m launcher.experiment run experiments/fashion_mnist_ladder.yaml --parallel 2": ("test", "tests/test_readme_commands.py::test_the_shipped_fashion_experiment_runs_a_variant_apart_from_its_committed_record"),
    "python -m launcher.experiment status experiments/fashion_mnist_ladder.yaml": ("test", "tests/test_experiment.py::test_report_and_status_of_an_experiment_that_has_not_run"),
    "python -m launcher.experiment report experiments/fashion_mnist_ladder.yaml": ("test", "tests/test_readme_commands.py::test_the_readme_results_are_what_report_makes_of_the_committed_records"),
    "python -m launcher.experiment submit experiments/cifar100_ladder.yaml --nodes 1 --gpus-per-node 1 --time 24:00:00 --max-parallel 8": ("test", "tests/test_experiment.py::test_the_cifar100_ladder_is_ready_for_a_cluster"),
    "python -m launcher.experiment run experiments/digits_lr_search.yaml": ("test", "tests/test_experiment.py::test_a_search_decides_parameters_before_the_ranks_start_prunes_on_every_rank_and_resumes_its_trial"),
    "python -m launcher.experiment cancel experiments/cifar100_ladder.yaml": ("test", "tests/test_slurm.py::test_an_experiment_runs_as_a_job_array_that_requeues_and_cancels"),
    "python -m launcher.shards fashion-mnist --src DIR --out data/fashion-mnist-1250 --shard-size 1250": ("test", "tests/test_readme_commands.py::test_the_shipped_fashion_experiment_runs_a_variant_apart_from_its_committed_record"),
    "python benchmarks/data_scale.py": ("test", "tests/test_readme_commands.py::test_the_data_scale_benchmark_runs"),
    "python benchmarks/startup.py --baseline 308766b": ("test", "tests/test_readme_commands.py::test_the_startup_benchmark_runs"),
    "make gpu-check": ("test", "tests/test_readme_commands.py::test_make_gpu_check_runs"),
    "python benchmarks/loader_imagenet.py": ("test", "tests/test_readme_commands.py::test_the_imagenet_loader_benchmark_runs"),
    "python benchmarks/augment_speed.py": ("test", "tests/test_readme_commands.py::test_the_augment_speed_benchmark_runs"),
    "python benchmarks/data_stream.py": ("test", "tests/test_readme_commands.py::test_the_data_stream_benchmark_runs"),
    "python benchmarks/data_wait.py": ("test", "tests/test_readme_commands.py::test_the_data_wait_benchmark_runs"),
    "python -m launcher.average runs/a runs/b [--greedy]": ("test", "tests/test_average.py::test_a_greedy_soup_is_never_worse_than_its_best_ingredient"),
    "python -m launcher.average runs/a runs/b runs/c --greedy": ("test", "tests/test_average.py::test_a_greedy_soup_is_never_worse_than_its_best_ingredient"),
    "accelerate launch --multi_gpu --num_processes N -m launcher recipes/wrn.yaml": ("test", "tests/test_distributed.py::test_one_process_two_processes_and_two_nodes_agree"),
    "accelerate launch --multi_gpu --num_machines M --machine_rank R --main_process_ip HOST0 --main_process_port 29500 --num_processes $((M*N)) -m launcher recipes/wrn.yaml": ("test", "tests/test_distributed.py::test_one_process_two_processes_and_two_nodes_agree"),
    "python benchmarks/loop_overhead.py": ("here", "benchmark"),
    "python -m launcher.slurm submit recipes/digits.yaml --sweep seed=0,1,2": ("test", "tests/test_slurm.py::test_a_sweep_makes_one_run_directory_per_value"),
    "python -m launcher.slurm status runs/wrn": ("test", "tests/test_slurm.py::test_two_nodes_train_with_two_ranks_like_a_local_run"),
    "python -m launcher.slurm cancel runs/wrn": ("test", "tests/test_slurm.py::test_cancel_checkpoints_and_stops_for_good"),
    "slurm/cluster.sh start": ("test", "tests/test_slurm.py::test_two_nodes_train_with_two_ranks_like_a_local_run"),
    "slurm/cluster.sh stop": ("test", "tests/test_slurm.py::test_two_nodes_train_with_two_ranks_like_a_local_run"),
    "python -m launcher.slurm submit recipes/digits.yaml --nodes 2 --time 10 \"plugins.checkpoint={}\"": ("test", "tests/test_slurm.py::test_two_nodes_train_with_two_ranks_like_a_local_run"),
    "python -m launcher.slurm status runs/digits": ("test", "tests/test_slurm.py::test_two_nodes_train_with_two_ranks_like_a_local_run"),
}


def readme_commands() -> set[str]:
    """Shell commands in the READMEs' code blocks (indented or fenced), comments stripped."""
    found = set()
    for name in READMES:
        lines, fenced, i = (REPO / name).read_text().splitlines(), False, 0
        while i < len(lines):
            line = lines[i]
            fenced = not fenced if line.startswith("```") else fenced
            if (line.startswith("    ") or fenced) and re.match(r"\s*(python |accelerate |make |slurm/\S+\.sh )", line):
                command = line.strip()
                while command.endswith("\\"):
                    i += 1
                    command = command[:-1].rstrip() + " " + lines[i].strip()
                found.add(re.split(r"\s{2,}#", command)[0].strip())
            i += 1
    return found


def test_the_readme_is_short_and_every_link_in_the_docs_leads_somewhere():
    """README.md is the front door (at most ~200 lines); the rest is in docs/, each page linked from
    it, and no relative link in README, docs or tests/README points at nothing."""
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    pages = sorted(p.name for p in (REPO / "docs").glob("*.md"))
    assert len(pages) >= 10 and all(f"(docs/{name})" in readme for name in pages), pages
    for path in [REPO / "README.md", REPO / "tests" / "README.md", *(REPO / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", path.read_text()):
            if not re.match(r"https?:|mailto:", target):
                assert (path.parent / target).exists(), f"{path.relative_to(REPO)} links to {target}, which does not exist"


def test_every_readme_command_has_a_test():
    shown = readme_commands()
    assert shown - README_COMMANDS.keys() == set(), "README commands without a test: add them to README_COMMANDS"
    assert README_COMMANDS.keys() - shown == set(), "README_COMMANDS lists commands the READMEs no longer show"
    for how, where in README_COMMANDS.values():
        if how == "test" and "::" in where:
            file, name = where.split("::")
            assert f"def {name}(" in (REPO / file).read_text(), f"{where} does not exist"


def command(text: str) -> list[str]:
    """A README command as argv for this environment: `python` is this interpreter, `accelerate`
    the one beside it, and optional [...] parts are dropped."""
    text = re.sub(r"\s*\[[^\]]*\]", "", text)
    argv = shlex.split(text)
    if argv[0] == "python":
        argv[0] = sys.executable
    elif argv[0] == "accelerate":
        argv[0] = str(Path(sys.executable).with_name("accelerate"))
    return argv


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A user's working directory: the shipped recipes, and the digits data the README's own
    command writes."""
    work = tmp_path_factory.mktemp("user")
    (work / "recipes").symlink_to(REPO / "recipes")
    result = run_cli(command("python -m launcher.shards digits --out data/digits"), cwd=work)
    assert result.returncode == 0, result.stderr[-2000:]
    return work


@pytest.mark.slow
def test_the_quick_start_commands_run(workdir):
    """Train (shortened), the report of that run, and the LR finder, as the README shows them."""
    result = run_cli(command("python -m launcher recipes/digits.yaml") + CHEAP, cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (workdir / "runs/digits/final/model.safetensors").is_file()
    assert (workdir / "runs/digits/report/report.json").is_file()

    result = run_cli(command("python -m launcher.report runs/digits"), cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]

    result = run_cli(command("python -m launcher.evaluate runs/digits [--weights ema]"), cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["val/samples"] == 360

    result = run_cli(command("python -m launcher.lr_find recipes/digits.yaml [--steps 100]") + ["--steps", "5"],
                     cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = workdir / "runs/digits/lr_find"
    assert json.loads((sweep / "lr_find.json").read_text())["suggested_lr"] > 0
    assert "report (" in result.stdout  # left out, with its reason: the sweep has no validation data
    assert not (sweep / "final").exists()  # the diverged sweep's weights are not kept


@pytest.mark.slow
def test_the_two_process_command_runs(workdir):
    argv = command("accelerate launch --multi_gpu --num_processes 2 -m launcher recipes/digits.yaml "
                   "train.epochs=3 data.batch_size=32")
    argv[2:2] = ["--main_process_port", str(free_port())]
    result = run_cli(argv + CHEAP + ["run.dir=runs/two"], cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((workdir / "runs/two/manifest.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_the_launch_commands_run(workdir, tmp_path):
    """`accelerate launch -m launcher recipes/wrn.yaml` with the recipe's data replaced by small
    synthetic CIFAR-100-shaped shards; --check as shown."""
    from tests.conftest import write_shards

    info = write_shards(tmp_path / "cifar", "synthetic", "--num-classes", "100", "--train", "64", "--val", "32")
    small = ["model.name=wrn16_4", "data.batch_size=8", "data.num_workers=0", f"data.train={info['train']}",
             f"data.val={info['val']}", "run.dir=runs/wrn", *CHEAP]
    argv = command("accelerate launch -m launcher recipes/wrn.yaml [key=value ...]")
    argv[2:2] = ["--num_processes", "1", "--main_process_port", str(free_port())]
    result = run_cli(argv + small, cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((workdir / "runs/wrn/status.json").read_text())["state"] == "finished"

    result = run_cli(command("python -m launcher --check recipes/wrn.yaml model.name=wrn16_4") + small[2:5], cwd=workdir)
    assert result.returncode == 0 and "wrn16_4" in result.stdout, result.stderr[-3000:]
    # every plugin option shown, defaults filled in (wrn.yaml sets only sam's rho, tta's flip...)
    assert "adaptive: false" in result.stdout and "eta: 0.01" in result.stdout  # sam's defaults


def test_the_slurm_commands_render_a_script(workdir, tmp_path, monkeypatch, capsys):
    """The submit commands, as dry runs in this process (the real cluster runs are in
    tests/test_slurm.py)."""
    from launcher.cluster.slurm import main
    from tests.conftest import write_shards

    info = write_shards(tmp_path / "cifar", "synthetic", "--num-classes", "100", "--train", "16", "--val", "8")
    data = [f"data.train={info['train']}", f"data.val={info['val']}"]
    monkeypatch.chdir(workdir)
    for text in ("python -m launcher.slurm submit recipes/wrn.yaml --nodes 2 --gpus-per-node 8 --time 24:00:00",
                 "python -m launcher.slurm submit recipes/wrn.yaml --nodes 2 --gpus-per-node 8 --time 24:00:00 "
                 "--partition gpu [key=value ...]",
                 "python -m launcher.slurm submit recipes/wrn.yaml --dry-run"):
        argv = command(text)[3:] + ([] if "--dry-run" in text else ["--dry-run"]) + data
        assert main(argv) == 0, text
        script = capsys.readouterr().out
        assert "#SBATCH" in script and "srun" in script


@pytest.mark.slow
def test_make_demo_runs(tmp_path):
    """`make demo`, shortened through RUN_ARGS: the venv is the one the suite runs in."""
    venv = Path(sys.executable).parent.parent
    result = run_cli(["make", "-s", "demo", f"VENV={venv}", f"RUN_ARGS=train.max_steps=2 run.progress=false "
                      f"run.dir={tmp_path / 'demo'}"], timeout=900)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    assert json.loads((tmp_path / "demo" / "manifest.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_make_gpu_check_runs(tmp_path):
    """`make gpu-check` where there is no GPU: the same script at tiny sizes on the CPU, so it is
    known to work before a GPU sees it. What it reports must hold: three loops measured eager and
    compiled for both configs, the launcher bit-identical to the plain loop in deterministic mode."""
    venv = Path(sys.executable).parent.parent
    out = tmp_path / "gpu.md"
    result = run_cli(["make", "-s", "gpu-check", f"VENV={venv}", f"GPU_CHECK_OUT={out}"], timeout=900)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    report = out.read_text()
    assert "No CUDA device here" in report and "skipped" in report  # (a) ran pytest -m gpu
    speed = [line for line in report.splitlines()
             if re.match(r"\| (resnet10t|wrn10_1) \d+px, batch \d+ \| (eager|compiled)", line)]
    assert len(speed) == 4 and all(float(line.split("|")[3].replace(",", "")) > 0 for line in speed)
    # (f) the WRN config with CIFAR augmentation on the device against in-memory batches
    device = [line for line in report.splitlines() if "AutoAugment cifar10 + erasing 0.5" in line]
    assert len(device) == 1 and all(float(device[0].split("|")[k].replace(",", "")) > 0 for k in (3, 4, 5))
    assert sum("compiled (aot_eager)" in line for line in speed) == 2
    identical = [line for line in report.splitlines() if re.match(r"\| (resnet10t|wrn10_1) \d+px \| 5 \|", line)]
    assert [line.split("|")[3].strip() for line in identical] == ["True", "True"]


@pytest.mark.slow
def test_the_benchmark_command_runs(tmp_path):
    result = run_cli(command("python benchmarks/loop_overhead.py") + ["--steps", "3", "--repeats", "1", "--warmup", "1",
                                                                     "--out", str(tmp_path / "bench.md")])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ratio" in (tmp_path / "bench.md").read_text()


def test_the_data_wait_benchmark_runs(tmp_path):
    result = run_cli(command("python benchmarks/data_wait.py") + ["--max-steps", "10", "--out", str(tmp_path / "w.md")])
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split("|") for line in (tmp_path / "w.md").read_text().splitlines() if line.startswith(("| 0 ", "| 2 "))]
    assert len(rows) == 2 and all(0 <= float(row[2].strip(" %")) < 100 for row in rows), rows
    assert "The meter's own cost: " in (tmp_path / "w.md").read_text()


def test_the_imagenet_loader_benchmark_runs(tmp_path):
    result = run_cli(command("python benchmarks/loader_imagenet.py") + ["--samples", "80", "--repeats", "1",
                                                                        "--out", str(tmp_path / "l.md")])
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in (tmp_path / "l.md").read_text().splitlines() if line.startswith(("| Random", "| +"))]
    assert len(rows) == 2 and all(float(row.split("|")[4]) > 0 for row in rows)


def test_the_augment_speed_benchmark_runs(tmp_path):
    result = run_cli(command("python benchmarks/augment_speed.py") + [
        "--samples", "256", "--repeats", "1", "--train-steps", "3", "--warmup", "1", "--train-repeats", "1",
        "--out", str(tmp_path / "a.md")])
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (tmp_path / "a.md").read_text().splitlines()
    rows = [line for line in lines if line.endswith("x |")]  # one per recipe: crop+flip ... resized crop
    assert [row.split("|")[1].strip() for row in rows] == [
        "crop 4 + flip", "crop 4 + flip + erasing 0.5", "crop 4 + flip + AutoAugment cifar10 + erasing 0.5",
        "crop 4 + flip + TrivialAugment", "rotation 15 + colour jitter 0.4", "resized crop (0.35-1) + flip"]
    assert all(float(row.split("|")[-2].strip().rstrip("x")) > 0 for row in rows)
    end_to_end = [line for line in lines if line.startswith(("| plain loop", "| launcher"))]
    assert len(end_to_end) == 3 and all(float(line.split("|")[-2]) > 0 for line in end_to_end)


def test_the_shipped_fashion_experiment_runs_a_variant_apart_from_its_committed_record(workdir, tmp_path):
    """`python -m launcher.experiment run experiments/fashion_mnist_ladder.yaml --parallel 2` on IDX
    files in the real format (random images), one seed of two rungs, 2 steps a trial: the command
    line's overrides make a variant, whose trials, record and report live apart from the
    experiment's own (the committed record is never touched)."""
    from tests.test_data import fake_idx_folder

    fake_idx_folder(tmp_path / "idx", n_train=2600, n_val=60)
    argv = command("python -m launcher.shards fashion-mnist --src DIR --out data/fashion-mnist-1250 --shard-size 1250")
    shards = run_cli([str(tmp_path / "idx") if a == "DIR" else a for a in argv], cwd=workdir)
    assert shards.returncode == 0, shards.stderr[-2000:]
    (workdir / "experiments").mkdir(exist_ok=True)
    shutil.copy(REPO / "experiments" / "fashion_mnist_ladder.yaml", workdir / "experiments")
    before = (REPO / "benchmarks" / "results" / "ladder_fashion.json").read_bytes()
    result = run_cli(command("python -m launcher.experiment run experiments/fashion_mnist_ladder.yaml --parallel 2")
                     + ["--seeds", "0", "--rungs", "baseline", "+ SAM", "data.val=data/fashion-mnist-1250/val-{000000..000000}.tar",
                        *CHEAP, "data.batch_size=8"], cwd=workdir, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    variant = next((workdir / "runs" / "fashion_mnist_ladder").glob("variant-*"))
    assert sorted(e["trial"] for e in json.loads((variant / "record.json").read_text())["trials"]) == [
        "00-baseline/seed-0", "01-sam/seed-0"]
    assert "| + SAM | rho 0.05 | val/top1 |" in (variant / "report" / "report.md").read_text()
    assert (REPO / "benchmarks" / "results" / "ladder_fashion.json").read_bytes() == before


# The experiments whose tables README's Results section shows: experiment file -> committed report.
README_EXPERIMENTS = {"fashion_mnist_ladder": "ladder_fashion", "fashion_mnist_5k_ladder": "ladder_fashion_5k"}


def table_rows(text: str) -> dict[str, list[str]]:
    """The first markdown table's rows by their first cell (rung names), header and separator left out."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = [line for line in lines[start:][:next((i for i, line in enumerate(lines[start:])
                                                      if not line.startswith("|")), None)]]
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in table[2:]]
    names = [row[0] for row in cells]
    assert len(set(names)) == len(names), "a rung name twice: rows are compared by name"
    return {row[0]: row for row in cells}


@pytest.mark.parametrize("experiment", sorted(README_EXPERIMENTS))
def test_the_readme_results_are_what_report_makes_of_the_committed_records(tmp_path, experiment):
    """docs/results.md's table (the one after the link to the report) is the committed report's,
    and that report is what `python -m launcher.experiment report` makes of the committed record
    (no run directory, nothing trained); its statistics are scipy's on the record's values."""
    from scipy import stats

    committed = REPO / "benchmarks" / "results" / f"{README_EXPERIMENTS[experiment]}.md"
    result = run_cli(command(f"python -m launcher.experiment report experiments/{experiment}.yaml")
                     + ["--out", str(tmp_path / "report.md")], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    regenerated, report = table_rows((tmp_path / "report.md").read_text()), table_rows(committed.read_text())
    assert regenerated == report and len(report) == 8
    # The numbers, from the record: mean ± std, Student t interval, Welch's p against the baseline.
    record = json.loads(committed.with_suffix(".json").read_text())["trials"]
    values = {}
    for entry in record:
        values.setdefault(entry["rung"], []).append(100 * entry["result"]["top1"])
    for name, row in report.items():
        v = values[name]
        mean, sem = sum(v) / len(v), stats.sem(v)
        assert row[3] == f"{mean:.2f} ± {stats.tstd(v):.2f}" and row[5] == "3"
        low, high = stats.t.interval(0.95, len(v) - 1, loc=mean, scale=sem)
        assert row[4] == f"{low:.2f} - {high:.2f}"
        if name != "baseline":
            p = stats.ttest_ind(v, values["baseline"], equal_var=False).pvalue
            shown = "< 0.001" if p < 0.001 else f"{p:.3f}"
            assert row[6] == f"{mean - sum(values['baseline']) / 3:+.2f} (p {shown}{', noise' if p >= 0.05 else ''})"
    section = (REPO / "docs" / "results.md").read_text()
    after_link = section[section.index(f"(../benchmarks/results/{committed.name})"):]
    table = after_link[after_link.index("\n|"):].split("\n\n")[0]  # the first table after the link
    shown = table_rows(table)
    assert list(shown) == list(report)  # every rung, in the report's order
    for name, (_, adds, top1, ci, delta) in shown.items():
        # the README's columns: rung, adds, top-1 (mean ± std), 95% interval, vs baseline (points, p)
        assert (adds, top1, ci, delta) == (report[name][1], report[name][3], report[name][4], report[name][6]), name


def test_the_data_scale_benchmark_runs(tmp_path):
    result = run_cli(command("python benchmarks/data_scale.py") + ["--sizes", "1500", "--out", str(tmp_path / "d.md")])
    assert result.returncode == 0, result.stderr[-3000:]
    row = next(line for line in (tmp_path / "d.md").read_text().splitlines() if line.startswith("| 1,500 |"))
    assert len(row.split("|")) == 16  # every column measured, the s3 ones (with and without a set index) included


def test_the_startup_benchmark_runs(tmp_path):
    """Every command of the start-up table, once, here and at a baseline commit (HEAD, in a git
    worktree, when this checkout is a git repository)."""
    argv = command("python benchmarks/startup.py --baseline 308766b")
    in_git = (REPO / ".git").exists()
    argv = argv[:-1] + ["HEAD"] if in_git else argv[:-2]
    result = run_cli([*argv, "--repeats", "1", "--out", str(tmp_path / "s.md")])
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in (tmp_path / "s.md").read_text().splitlines() if line.startswith("| `")]
    columns = 2 if in_git else 1
    assert len(rows) == 5 and all(float(cell) > 0 for row in rows for cell in row.split("|")[2:2 + columns])


def test_the_data_stream_benchmark_runs(tmp_path):
    """The object-store comparison, cheaply (300 samples, the launcher and WebDataset: the other
    anchors are not dependencies). What it reports must hold: the launcher's resumed batches are
    bit-exact, every sample is read once, and resuming at 90% fetches less than an epoch."""
    out = tmp_path / "s.md"
    result = run_cli(command("python benchmarks/data_stream.py") + [
        "--samples", "300", "--per-shard", "60", "--repeats", "1", "--loaders", "launcher", "webdataset",
        "--out", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in out.read_text().splitlines() if line.startswith("| launcher") or line.startswith("| webdataset")}
    launcher, webdataset = rows["launcher"], rows["webdataset"]
    assert launcher[5:8] == ["yes", "yes", "yes"] and webdataset[7] == "yes"  # same samples, bit-exact, once
    assert float(launcher[4]) < float(launcher[8])  # resume fetched < fetched per epoch


def test_the_guarantee_table_names_tests_that_exist():
    """tests/README.md lists bad inputs and faults with the test that covers each: every test it
    names must exist (FILE.py::name in that file, a bare test_name in some test file)."""
    table = (REPO / "tests" / "README.md").read_text()
    sources = {p.name: p.read_text() for p in (REPO / "tests").glob("test_*.py")}
    qualified = re.findall(r"(test_\w+\.py)::(test_\w+)", table)
    assert len(qualified) >= 20
    for file, name in qualified:
        assert f"def {name}(" in sources[file], f"tests/README.md names {file}::{name}, which does not exist"
    for name in re.findall(r"`(test_\w+)`", table):
        assert any(f"def {name}(" in text for text in sources.values()), f"tests/README.md names {name}"
