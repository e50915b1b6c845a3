"""The command line: bad input gives one paragraph naming the problem and the fix, exit
status 2, no traceback, and no run directory that a later run could mistake for a real one."""

from __future__ import annotations

import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from launcher.__main__ import main
from launcher.data import expand_pattern
from tests.conftest import REPO, run_cli, small_recipe


def write_recipe(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text("# python -m launcher bad.yaml\n" + yaml.safe_dump(raw))
    return path


def bad_inputs(digits, tmp_path):
    empty = tmp_path / "empty.tar"
    tarfile.open(empty, "w").close()
    first = Path(expand_pattern(digits["train"])[0])
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(first.read_bytes()[:30000])
    run = tmp_path / "run"
    return {
        "misspelled key": (small_recipe(digits, run, train={"epochs": 1, "epoch": 2}), [],
                           "unknown key 'train.epoch'. Did you mean 'epochs'?"),
        "wrong type": (small_recipe(digits, run), ["data.batch_size=many"], "'data.batch_size' = 'many'"),
        "missing shards": (small_recipe(digits, run, data={"train": str(tmp_path / "none-{0..3}.tar")}), [],
                           "none-0.tar' does not exist"),
        "empty shard": (small_recipe(digits, run, data={"train": str(empty)}), [], "holds no samples"),
        "truncated shard": (small_recipe(digits, run, data={"train": str(truncated)}), [], "is truncated"),
        "unknown plugin": (small_recipe(digits, run, plugins={"wandbx": {}}), [], "Did you mean 'wandb'?"),
        "unknown model": (small_recipe(digits, run, model={"name": "resnet181", "num_classes": 10}), [],
                          "Unknown model 'resnet181'"),
        "bad override": (small_recipe(digits, run), ["optimizer.nam=adamw"], "Did you mean 'name'?"),
        "infinite lr": (small_recipe(digits, run), ["optimizer.lr=.inf"], "'optimizer.lr' is not a finite number"),
        "nan in kwargs": (small_recipe(digits, run), ["optimizer.kwargs={eps: .nan}"],
                          "'optimizer.kwargs.eps' is not a finite number"),
        # Values --check used to accept and the run crashed on (or tried to allocate 57 GB for).
        "zero std": (small_recipe(digits, run), ["data.std=[0.5, 0, 0.5]"], "every value must be positive"),
        "huge padding": (small_recipe(digits, run), ["data.augment.crop_padding=30000"],
                         "crop_padding (30000) must be smaller than data.image_size (16)"),
        "mean for another channel count": (small_recipe(digits, run), ["model.in_chans=1"],
                                           "model.in_chans is 1, data.mean has 3 values"),
        "path component over 255 bytes": (small_recipe(digits, run), [f"data.train={tmp_path}/{'a' * 300}.tar"],
                                          "is 304 bytes long; file systems take at most 255"),
        "run directory name over 255 bytes": (small_recipe(digits, run), [f"run.dir={run}/{'r' * 300}"],
                                              "is 300 bytes long; file systems take at most 255"),
    }


@pytest.mark.parametrize("case", ["misspelled key", "wrong type", "missing shards", "empty shard",
                                  "truncated shard", "unknown plugin", "unknown model", "bad override",
                                  "infinite lr", "nan in kwargs", "zero std", "huge padding",
                                  "mean for another channel count", "path component over 255 bytes",
                                  "run directory name over 255 bytes"])
def test_bad_input_is_one_paragraph_and_leaves_no_run_directory(case, digits, tmp_path, capsys):
    raw, overrides, message = bad_inputs(digits, tmp_path)[case]
    status = main([str(write_recipe(tmp_path, raw)), *overrides])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err  # one paragraph
    assert message in err
    assert not (tmp_path / "run").exists()


def test_bad_input_from_the_real_command_has_no_traceback(digits, tmp_path):
    raw, overrides, _ = bad_inputs(digits, tmp_path)["missing shards"]
    result = run_cli([sys.executable, "-m", "launcher", str(write_recipe(tmp_path, raw))])
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "does not exist" in result.stderr


def test_list_plugins_option_errors_and_check_answer_without_torch_or_timm(digits):
    """`--list-plugins`, a bad plugin option and `--check` answer without importing torch, timm or
    accelerate: plugins import them on first use (launcher/lazy.py), and --check knows timm's model
    names from its source files (launcher/models/names.py). A name not found there is asked of timm,
    so a misspelt one is still refused."""
    recipe = str(REPO / "recipes" / "digits.yaml")
    check = ["--check", recipe, f"data.train={digits['train']}", f"data.val={digits['val']}"]

    def probe(*commands: list[str]) -> str:
        code = ("import sys\nfrom launcher.__main__ import main\n"
                f"codes = [main(args) for args in {list(commands)!r}]\n"
                "print('codes:', codes, 'loaded:', sorted(m for m in ('torch', 'timm', 'accelerate', 'webdataset') "
                "if m in sys.modules))\n")
        # Without the tests' own plugin module (conftest names it; it imports torch).
        result = run_cli([sys.executable, "-c", code], env={"LAUNCHER_PLUGINS": ""})
        return result.stdout + result.stderr

    out = probe(["--list-plugins"], [recipe, "plugins.ema.decay=abc"], check, [*check, "model.name=wrn16_1"])
    assert "codes: [0, 2, 0, 0] loaded: []" in out, out
    assert "Plugin 'ema' options are invalid: 'decay' = 'abc'" in out and "recipe OK" in out
    out = probe([*check, "model.name=wrn10_1x"])
    assert "Unknown model 'wrn10_1x' (model.name). Did you mean" in out and "codes: [2]" in out, out


def test_the_model_names_read_from_timms_source_are_timms_registry():
    """--check's model names without importing timm: exactly timm's registry, and the WideResNets."""
    import timm

    import launcher.models.factory  # noqa: F401  (registers the WideResNets)
    from launcher.models.names import known_without_timm

    # Other tests of this session register models of their own: compare with timm's and ours.
    registry = {n for n in timm.list_models()
                if timm.models.model_entrypoint(n).__module__.startswith(("timm.", "launcher."))}
    assert known_without_timm() == registry


@pytest.mark.parametrize("pattern", ["a/train-{000000..000003}.tar", "s3://b/x-{0..2}.tar::s3://b/y-{a,b}.tar",
                                     "plain.tar", "pipe:cat d/{1..2}.tar"])
def test_shard_patterns_expand_as_webdataset_expands_them(pattern):
    """expand_pattern skips importing webdataset (and torch) for patterns without `$`: same result."""
    from webdataset.shardlists import expand_urls

    assert expand_pattern(pattern) == list(expand_urls(pattern))


def test_check_prints_the_resolved_recipe(digits, capsys):
    shards = [f"data.train={digits['train']}", f"data.val=pipe:cat {expand_pattern(digits['val'])[0]}"]
    assert main(["--check", str(REPO / "recipes" / "digits.yaml"), "train.epochs=3", *shards]) == 0
    out = capsys.readouterr().out
    assert yaml.safe_load(out)["train"]["epochs"] == 3 and "run directory: runs/digits" in out
    # pipe: shards are shell commands (WebDataset's design): --check says which ones the run will run.
    assert f"# pipe: shards run this shell command: cat {expand_pattern(digits['val'])[0]}" in out


@pytest.mark.parametrize("override, message", [
    ("model.name=resnet181", "Unknown model 'resnet181' (model.name). Did you mean 'resnet18'?"),
    ("data.train=/nowhere/train-{0..1}.tar", "data.train: shard '/nowhere/train-0.tar' does not exist"),
])
def test_check_checks_what_a_run_checks_first(digits, capsys, override, message):
    assert main(["--check", str(REPO / "recipes" / "digits.yaml"), f"data.train={digits['train']}",
                 f"data.val={digits['val']}", override]) == 2
    assert message in capsys.readouterr().err


def test_list_plugins_command(capsys):
    assert main(["--list-plugins"]) == 0
    assert "wandb: " in capsys.readouterr().out


def test_usage_without_arguments(capsys):
    assert main([]) == 2 and "python -m launcher RECIPE" in capsys.readouterr().out


def test_a_file_that_is_not_a_yaml_recipe_is_refused_in_one_line(tmp_path, capsys):
    binary = tmp_path / "model.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    nested = tmp_path / "nested.yaml"
    nested.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    for path, message in ((binary, "is not a text file"), (nested, "nested too deeply")):
        assert main([str(path)]) == 2
        assert message in capsys.readouterr().err


# Ten levels of aliases, nine references each: 476 bytes that expand to 9^10 values.
ALIAS_BOMB = "a0: &a0 [x]\n" + "".join(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 11))


@pytest.mark.timeout(60)  # before the fix, --check walked the 9^10 references for ever
def test_yaml_aliases_that_explode_or_refer_to_themselves_are_refused_at_once(digits, tmp_path, capsys):
    from launcher.commands.evaluate import main as evaluate
    from launcher.commands.report import main as report

    bomb, loop = tmp_path / "bomb.yaml", tmp_path / "loop.yaml"
    bomb.write_text(ALIAS_BOMB)
    loop.write_text("a: &a [*a]\n")
    for path, words in ((bomb, "its aliases expand to more than 100,000 values"),
                        (loop, "an alias refers to the node that contains it")):
        assert main(["--check", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: Recipe '{path}' is refused: {words}") and err.count("\n") == 1, err
    # Someone else's run directory: evaluate and report read its recipe.yaml the same way.
    (tmp_path / "run" / "final").mkdir(parents=True)
    (tmp_path / "run" / "final" / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "run" / "recipe.yaml").write_text(ALIAS_BOMB)
    for command in (evaluate, report):
        assert command([str(tmp_path / "run")]) == 2
        assert "aliases expand to more than" in capsys.readouterr().err
    # A run that starts in such a directory only looks there for its augmentation path: not fooled.
    raw = small_recipe(digits, tmp_path / "run")
    assert main(["--check", str(write_recipe(tmp_path, raw))]) == 0
    # Aliases of a sane size still work.
    sane = write_recipe(tmp_path, raw)
    sane.write_text(sane.read_text().replace("log_every: 5", "log_every: &s 3").replace("seed: 0", "seed: *s"))
    assert main(["--check", str(sane)]) == 0
    out = capsys.readouterr().out
    assert "seed: 3" in out and "log_every: 3" in out


def test_a_huge_value_is_shown_cut_short(digits, tmp_path, capsys):
    raw = small_recipe(digits, tmp_path / "run", data={"train": "x" * 10_000_000, "batch_size": "many"})
    assert main(["--check", str(write_recipe(tmp_path, raw))]) == 2
    err = capsys.readouterr().err
    assert "(10,000,000 characters)" in err and len(err) < 2000, len(err)


def test_check_of_a_folder_and_list_plugins_with_arguments_say_what_is_wrong(tmp_path, capsys):
    assert main(["--check", str(tmp_path)]) == 2
    assert f"'{tmp_path}' is a folder, not a recipe file" in capsys.readouterr().err
    assert main(["--list-plugins", "extra", "args"]) == 2
    assert "--list-plugins takes no arguments (got 'extra args')" in capsys.readouterr().err


def test_help_lists_every_command_and_each_answers_its_own_help(capsys):
    import importlib
    import re

    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    modules = sorted(set(re.findall(r"python -m (launcher\.\w+)", text)))
    assert modules == ["launcher.evaluate", "launcher.experiment", "launcher.export", "launcher.lr_find", "launcher.predict",
                       "launcher.report", "launcher.shards", "launcher.slurm"]
    for name in modules:
        module = importlib.import_module(name)
        if hasattr(module, "__path__"):  # a package: its command is its __main__
            module = importlib.import_module(f"{name}.__main__")
        with pytest.raises(SystemExit) as stop:
            module.main(["--help"])
        assert stop.value.code == 0, name
        assert "usage: python -m " + name in capsys.readouterr().out


@pytest.mark.parametrize("rank, failed_first, printed", [
    ("0", None, True), ("1", None, False),  # every rank fails alike: rank 0 speaks for them
    ("1", True, True), ("0", False, False),  # a data error on rank 1 first: rank 0 is stopped by its watchdog
])
def test_the_rank_that_failed_first_prints_the_error(monkeypatch, capsys, rank, failed_first, printed):
    from launcher.errors import LauncherError, run_command

    def fail():
        err = LauncherError("data.train: could not fetch 'http://x/a.tar' after 3 attempts")
        if failed_first is not None:
            err.failed_first = failed_first
        raise err

    monkeypatch.setenv("RANK", rank)
    assert run_command(fail) == 2
    assert ("error: data.train: could not fetch" in capsys.readouterr().err) == printed


def test_help_imports_neither_torch_nor_timm_and_wide_resnets_register_once_timm_comes():
    """`--help` answers without torch or timm (6-7 s of imports here); importing launcher still
    registers the WideResNets into timm, right after timm is imported, whenever that is."""
    probe = ("import sys\nfrom launcher.__main__ import main\nassert main(['--help']) == 0\n"
             "print('loaded:', sorted(m for m in ('torch', 'timm', 'accelerate', 'launcher.models') if m in sys.modules))\n"
             "import timm\nprint('wrn:', timm.create_model('wrn10_1', num_classes=3).__class__.__name__)\n")
    result = run_cli([sys.executable, "-c", probe])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "loaded: []" in result.stdout and "wrn: WideResNet" in result.stdout, result.stdout
