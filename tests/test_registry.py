"""The plugin registry: registration, discovery, option schemas, incompatibilities, the
golden order of hook calls, and --list-plugins."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest

from launcher import registry
from tests.conftest import REPO
from launcher.errors import LauncherError
from launcher.loop import train
from launcher.config.load import validate_recipe
from launcher.registry import Plugin, PluginOptions, PluginSet, register
from tests.conftest import small_recipe


@pytest.fixture
def scratch_registry(monkeypatch):
    """Register throw-away plugins without leaking them into other tests."""
    registry.discover()
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    return registry._REGISTRY


def test_builtin_plugins_are_found_by_scanning_the_plugins_package():
    import pkgutil

    import launcher.plugins

    modules = {m.name for m in pkgutil.iter_modules(launcher.plugins.__path__)}
    assert modules == {p.stem for p in (REPO / "plugins").glob("*.py")} - {"__init__"}
    found = {cls.__module__.split(".")[-1] for cls in registry.discover().values()
             if cls.__module__.startswith("launcher.plugins.")}
    assert found == modules


def test_entry_point_plugins_are_loaded(monkeypatch, scratch_registry):
    module = types.ModuleType("thirdparty_trick")

    def load():
        @register("thirdparty_trick")
        class ThirdParty(Plugin):
            """From another package."""
        module.ThirdParty = ThirdParty

    class FakeEntryPoint:
        name, value = "thirdparty_trick", "thirdparty_trick:ThirdParty"

        def load(self):
            load()

    monkeypatch.setattr(registry, "_discovered", False)
    monkeypatch.setattr(registry.importlib.metadata, "entry_points",
                        lambda group: [FakeEntryPoint()] if group == registry.ENTRY_POINT_GROUP else [])
    assert "thirdparty_trick" in registry.discover()


def test_the_installed_package_holds_no_top_level_plugins_and_third_party_plugins_join_it(tmp_path):
    """pip installs the built-in plugins as launcher.plugins (nothing named `plugins` lands in
    site-packages, where another project's could collide); a separately installed distribution
    with a `launcher.plugins` entry point adds its plugin beside them."""
    import shutil
    import subprocess
    import sys

    from tests.conftest import run_cli

    src = tmp_path / "src"
    for name in ("launcher", "plugins"):
        shutil.copytree(REPO / name, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
                              str(site), *map(str, (tmp_path / "dist").glob("*.whl"))], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-3000:]
    top_level = sorted(p.name for p in site.iterdir() if not p.name.endswith(".dist-info"))
    assert top_level == ["launcher"], top_level
    assert (site / "launcher" / "plugins" / "sam.py").is_file()
    # A third-party distribution: a module and its metadata with the entry point, as pip leaves them.
    (site / "thirdparty_trick.py").write_text(
        "from launcher.registry import Plugin, register\n\n\n"
        "@register('thirdparty_trick')\nclass ThirdPartyTrick(Plugin):\n    \"\"\"From another package.\"\"\"\n")
    info = site / "thirdparty_trick-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-trick\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[launcher.plugins]\nthirdparty_trick = thirdparty_trick\n")
    env = {"PYTHONPATH": str(site), "LAUNCHER_PLUGINS": ""}  # not the tests' own plugins (tests/ is not on the path)
    probe = run_cli([sys.executable, "-c", "import launcher, launcher.plugins.sam; print(launcher.__file__)\n"
                     "import importlib.util; print(importlib.util.find_spec('plugins'))"], env=env, cwd=tmp_path)
    assert probe.stdout.split() == [str(site / "launcher" / "__init__.py"), "None"], probe.stdout + probe.stderr
    listed = run_cli([sys.executable, "-m", "launcher", "--list-plugins"], env=env, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr[-3000:]
    assert "thirdparty_trick" in listed.stdout and "sam" in listed.stdout, listed.stdout


def test_register_rejects_non_plugins_and_misspelled_hooks(scratch_registry):
    with pytest.raises(TypeError, match="subclass"):
        register("x")(object)
    with pytest.raises(TypeError, match="unknown hook"):
        @register("typo")
        class Typo(Plugin):
            def before_optimiser_step(self, ctx):
                pass


def test_incompatible_combinations_are_refused_at_load(digits, tmp_path, scratch_registry):
    @register("alpha")
    class Alpha(Plugin):
        """A."""
        incompatible = {"beta": "both rewrite the loss"}

    @register("beta")
    class Beta(Plugin):
        """B."""

        class Options(PluginOptions):
            level: int = 1

        @classmethod
        def check_recipe(cls, recipe, options):
            return "needs an evaluation set (data.val)" if recipe.data.val is None else None

    with pytest.raises(LauncherError, match="'alpha' and 'beta' cannot run together: both rewrite the loss"):
        validate_recipe(small_recipe(digits, tmp_path, plugins={"alpha": {}, "beta": {}}))
    with pytest.raises(LauncherError, match="Plugin 'beta' cannot run with this recipe: needs an evaluation set"):
        validate_recipe(small_recipe(digits, tmp_path, data={"val": None}, plugins={"beta": {"level": 2}}))


def test_transform_hooks_chain_in_recipe_order_and_notify_hooks_all_run():
    calls = []

    class Add(Plugin):
        def __init__(self, k):
            super().__init__(PluginOptions())
            self.k = k

        def transform_batch(self, ctx, value):
            calls.append(self.k)
            return value * 10 + self.k

        def on_log(self, ctx, row):
            calls.append(f"log{self.k}")

    plugins = PluginSet([Add(1), Add(2), Plugin(PluginOptions())])
    assert plugins.chain("transform_batch", None, 0) == 12
    plugins.call("on_log", None, {})
    assert calls == [1, 2, "log1", "log2"]


def test_plugin_state_is_keyed_by_name():
    class Counter(Plugin):
        name = "counter"

        def __init__(self):
            super().__init__(PluginOptions())
            self.n = 0

        def state_dict(self):
            return {"n": self.n}

        def load_state_dict(self, state):
            self.n = state["n"]

    a = Counter()
    a.n = 7
    b = Counter()
    PluginSet([b]).load_state_dict(PluginSet([a]).state_dict())
    assert PluginSet([a]).state_dict() == {"counter": {"n": 7}} and b.n == 7


def test_golden_hook_order_for_a_short_run(digits, tmp_path):
    """The exact order of hook calls: 3 steps per epoch (global batch 512 of 1,437 samples),
    stop after 4 steps, log every 2 steps, evaluate every epoch and at the end."""
    raw = small_recipe(digits, tmp_path / "run", train={"epochs": 2, "max_steps": 4},
                       run={"log_every": 2}, data={"batch_size": 512}, plugins={"recorder": {}})
    train(validate_recipe(raw))
    hooks = json.loads((tmp_path / "run" / "recorder-rank0.json").read_text())["hooks"]
    step = ["transform_batch", "micro_batches", "transform_loss", "before_optimizer_step", "after_optimizer_step"]
    row = ["log_row", "on_log"]
    end = ["on_step_end"]
    evaluation = ["eval_models", "eval_logits", "on_evaluate", *row]  # one validation batch
    expected = (["accelerator_options", "param_groups", "setup", "criterion", "after_prepare"]
                + ["on_epoch_start"] + step + end + step + row + end + step + end  # epoch 0: steps 1-3
                + evaluation + ["on_epoch_end"]
                + ["on_epoch_start"] + step + row + end + evaluation  # epoch 1: step 4, stop
                + ["on_train_end"])
    assert hooks == expected
    assert set(hooks) == set(registry.HOOKS)  # the recorder traces every hook there is


def test_list_plugins_prints_every_plugin_with_options_and_defaults():
    text = registry.describe_plugins()
    for name, cls in registry.discover().items():
        assert f"{name}: " in text
        for option in cls.Options.model_fields:
            assert f"    {option}: " in text
    assert "mode: Literal['offline', 'online', 'disabled'] = 'offline'" in text


def _project_files() -> list[Path]:
    """The project's modules: launcher/ (whose plugins/ is a link to the top-level folder, not
    followed here) and plugins/."""
    return sorted([*(REPO / "launcher").rglob("*.py"), *(REPO / "plugins").glob("*.py")])


def _module_name(path: Path) -> str:
    """The module's import name: the top-level plugins/ folder is the package launcher.plugins."""
    parts = path.relative_to(REPO).with_suffix("").parts
    if parts[0] == "plugins":
        parts = ("launcher", *parts)
    return ".".join(parts).removesuffix(".__init__")


def _imports_of_the_project() -> dict[str, set[str]]:
    """Module -> the project modules it imports (top-level and inside functions), by parsing."""
    import ast

    from tests.conftest import REPO

    graph: dict[str, set[str]] = {}
    for path in _project_files():
        module = _module_name(path)
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            for name in names:
                if name.split(".")[0] in ("launcher", "plugins") and name not in ("launcher", "launcher.plugins"):
                    targets.add(name)
        graph[module] = targets - {module}
    return graph


def _libraries_of_the_project() -> dict[str, set[str]]:
    """Module -> every module name it imports (third-party included), by parsing."""
    import ast

    out = {}
    for path in _project_files():
        module = _module_name(path)
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module)
        out[module] = names
    return out


def test_no_module_is_over_500_lines_without_saying_why():
    import ast

    for path in _project_files():
        text = path.read_text()
        if len(text.splitlines()) > 500:
            docstring = ast.get_docstring(ast.parse(text)) or ""
            assert "Over 500 lines" in docstring, f"{path.relative_to(REPO)} has {len(text.splitlines())} lines"


def test_the_documented_commands_still_run_from_their_entry_modules(capsys):
    """`python -m launcher.evaluate` and the others are short entry modules over launcher/commands,
    launcher/cluster and launcher/data: each answers --help."""
    import importlib

    for name in ("evaluate", "predict", "export", "report", "lr_find", "shards", "slurm", "average"):
        entry = importlib.import_module(f"launcher.{name}")
        with pytest.raises(SystemExit) as stop:
            entry.main(["--help"])
        assert stop.value.code == 0 and "usage:" in capsys.readouterr().out, name
    assert importlib.import_module("launcher.node").main.__module__ == "launcher.cluster.node"


def test_the_import_graph_has_no_circle_and_plugins_stand_alone():
    graph = _imports_of_the_project()
    assert {"launcher.loop", "launcher.plugins.checkpoint", "launcher.data", "launcher.data.loader"} <= set(graph)
    for module, targets in graph.items():
        # Installed, the built-in plugins are launcher.plugins: nothing imports a top-level `plugins`.
        assert not any(t.split(".")[0] == "plugins" for t in targets), (module, targets)
        if module.startswith("launcher.plugins."):
            # Plugins talk to the loop through ctx only, and never to each other.
            assert not {t for t in targets if t.startswith("launcher.plugins.") or t == "launcher.loop"}, (module, targets)
        elif module.startswith("launcher."):
            assert not any(t.startswith("launcher.plugins.") for t in targets), (module, targets)  # the core names no plugin
        if module.startswith("launcher.commands."):
            # The commands share launcher.commands.finished_run and never import each other.
            others = {t for t in targets if t.startswith("launcher.commands.") and t != "launcher.commands.finished_run"}
            assert not others, (module, others)
    # The libraries of DeepSpeed and FSDP are known to the strategies alone.
    for module, libraries in _libraries_of_the_project().items():
        if not module.startswith("launcher.strategies."):
            assert not {name for name in libraries if name.split(".")[0] == "deepspeed"
                        or name.startswith(("torch.distributed.fsdp", "torch.distributed.checkpoint"))}, module
    # Each room is a subpackage: the entry modules of the documented commands are all that stays flat.
    flat = sorted(p.stem for p in (REPO / "launcher").glob("*.py"))
    assert flat == ["__init__", "__main__", "after_import", "average", "checkpoints", "console", "errors", "evaluate",
                    "export", "lazy", "loop", "lr_find", "node", "optim", "predict", "preflight", "registry", "report",
                    "runlog", "shards", "slurm", "throughput"], flat
    # Depth-first search for a cycle; the path is the message.
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            assert state.get(target) != 1, "import circle: " + " -> ".join(path + [target])
            if target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_an_order_that_matters_is_declared_and_the_wrong_one_refused(digits, tmp_path, capsys):
    """report logs its images to the wandb run, which wandb's on_train_end closes: hooks run in
    recipe order, so report must come first."""
    wrong = small_recipe(digits, tmp_path / "run", plugins={"wandb": {"mode": "disabled"}, "report": {}})
    with pytest.raises(LauncherError, match=r"Plugin 'report' must be listed before 'wandb' under plugins: .*Swap"):
        validate_recipe(wrong)
    right = small_recipe(digits, tmp_path / "run", plugins={"report": {}, "wandb": {"mode": "disabled"}})
    assert list(validate_recipe(right).plugins) == ["report", "wandb"]
    assert "must be listed before 'wandb'" in registry.describe_plugins()
