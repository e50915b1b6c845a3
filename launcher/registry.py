"""The plugin registry and the plugin contract.

A plugin is a class registered under a name:

    from launcher.registry import Plugin, PluginOptions, register

    @register("my_trick")
    class MyTrick(Plugin):
        '''One line saying what it does. Hooks: transform_loss. Paper: ...'''

        class Options(PluginOptions):
            weight: float = Field(0.1, description="why it matters")

        incompatible = {"other_plugin": "why they cannot run together"}

        def transform_loss(self, ctx, loss, batch, logits):
            return loss + self.options.weight * ...

Built-in plugins are the modules of the `plugins` package (found by scanning it, so
the core never names one); third-party packages register theirs through the
`launcher.plugins` entry-point group; modules named in the environment variable
`LAUNCHER_PLUGINS` (comma-separated, e.g. `mylab.tricks`) are imported too, for plugins
that are not packaged. The hook methods a plugin may define are listed
in `HOOKS` and documented in launcher/loop.py, where they are called.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import pkgutil
import warnings
from typing import Any, Callable, ClassVar, Optional

from pydantic import ValidationError

from launcher.errors import LauncherError, did_you_mean
from launcher.config.schema import StrictModel

ENTRY_POINT_GROUP = "launcher.plugins"

# Hook name -> kind. "notify" hooks return nothing; "transform" hooks take a value and
# return it (possibly changed), chained through the plugins in recipe order.
HOOKS: dict[str, str] = {
    "accelerator_options": "transform",  # (ctx, options: dict) -> dict   before Accelerator() is built
    "param_groups": "transform",  # (ctx, groups: list[dict]) -> list   the optimizer's groups; ctx.model is built
    "setup": "notify",  # (ctx)          model/optimizer built, not yet prepared
    "criterion": "transform",  # (ctx, criterion) -> criterion   the training loss, chained in recipe order
    "after_prepare": "notify",  # (ctx)          after accelerator.prepare; resume state is loaded after this
    "on_epoch_start": "notify",  # (ctx)
    "transform_batch": "transform",  # (ctx, batch: Batch) -> Batch
    # (ctx, count: int) -> int   micro-batches to split ctx.batch into; asked before every step, and
    # again after an out-of-memory error (ctx.out_of_memory set): a larger count retries the step
    "micro_batches": "transform",
    "transform_loss": "transform",  # (ctx, loss, micro_batch, logits) -> loss   the micro-batch's mean loss
    "before_optimizer_step": "notify",  # (ctx)  gradients complete and unscaled; ctx.train_step.recompute_gradients() exists
    "after_optimizer_step": "notify",  # (ctx)
    "on_step_end": "notify",  # (ctx)  the step is complete and its row logged (checkpoint here)
    "eval_models": "transform",  # (ctx, models: dict[prefix, nn.Module]) -> dict
    "eval_logits": "transform",  # (ctx, logits, images, model, prefix) -> dict[prefix, logits]
    "on_evaluate": "notify",  # (ctx, metrics: dict)
    "log_row": "transform",  # (ctx, row: dict) -> dict   add metrics to a row before it is written
    "on_log": "notify",  # (ctx, row: dict)  every row written to metrics.jsonl
    "on_epoch_end": "notify",  # (ctx)  after the epoch's evaluation was logged
    "on_train_end": "notify",  # (ctx)  after the final weights are saved
}


class PluginOptions(StrictModel):
    """Base class of a plugin's options: typed fields with defaults; unknown keys are errors; a
    number option takes numbers only (launcher/config/schema.py)."""


class Plugin:
    """Base class. Override only the hooks you need; every hook defaults to doing nothing."""

    name: ClassVar[str] = ""
    Options: ClassVar[type[PluginOptions]] = PluginOptions
    # Other plugin names this one cannot run with, each with the reason.
    incompatible: ClassVar[dict[str, str]] = {}
    # Other plugin names that, when present, must come after this one under plugins: (hooks
    # run in recipe order), each with the reason. The other order is refused when the recipe loads.
    listed_before: ClassVar[dict[str, str]] = {}

    def __init__(self, options: PluginOptions):
        self.options = options

    # Where this plugin cannot run, each with the reason, checked when the recipe loads. Keys:
    # a strategy ("ddp", "zero0".."zero3", or "deepspeed" for every ZeRO stage), a precision
    # ("fp32", "bf16", "fp16"), or "strategy/precision" ("deepspeed/fp16", "zero3/bf16").
    # The README's plugin x strategy x precision table is generated from these declarations.
    refused_under: ClassVar[dict[str, str]] = {}
    # Where it runs differently, said in that table (e.g. "zero3": "gathers the weights").
    notes_under: ClassVar[dict[str, str]] = {}

    @classmethod
    def precision(cls, options: PluginOptions) -> Optional[str]:
        """The training precision this plugin sets ("bf16", "fp16"), if it sets one."""
        return None

    # What a strategy that runs the optimizer step itself (DeepSpeed) must be told, declared
    # instead of written into its config by the plugin: the strategy builds its config once.
    @classmethod
    def accumulation_steps(cls, options: PluginOptions) -> Optional[int]:
        """Micro-batches per optimizer step, if this plugin splits the batch."""
        return None

    @classmethod
    def clipping_norm(cls, options: PluginOptions) -> Optional[float]:
        """The 2-norm this plugin clips the gradients to, if it clips."""
        return None

    # True for a plugin whose `criterion` hook returns a new loss that ignores the criterion it
    # receives (focal loss): it must come before any plugin that changes the loss through that
    # hook, or their change would be dropped; the recipe loader refuses the other order.
    replaces_loss: ClassVar[bool] = False

    # True for a plugin that saves and restores runs, so that an interrupted job can be
    # relaunched (job schedulers check for one before submitting).
    resumes_runs: ClassVar[bool] = False

    # True for a plugin that only reports (loggers, dashboards): its options do not change what
    # a run trains, so an experiment's record of a trial does not depend on them.
    reports_only: ClassVar[bool] = False

    @classmethod
    def check_recipe(cls, recipe, options: PluginOptions) -> Optional[str]:
        """Return a reason if this plugin cannot run with this recipe (precision, strategy...)."""
        return None

    @classmethod
    def check_run_dir(cls, recipe, options: PluginOptions, run_dir) -> Optional[str]:
        """Return a reason if this recipe cannot continue in this existing run directory
        (checked by `python -m launcher.slurm submit` before a job waits in the queue)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """What this plugin needs to continue exactly after a resume (tensors, numbers, lists)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


_REGISTRY: dict[str, type[Plugin]] = {}
_discovered = False


def register(name: str) -> Callable[[type[Plugin]], type[Plugin]]:
    """Class decorator: make a Plugin subclass available to recipes under `name`."""

    def decorate(cls: type[Plugin]) -> type[Plugin]:
        if not (isinstance(cls, type) and issubclass(cls, Plugin)):
            raise TypeError(f"@register('{name}') must decorate a subclass of launcher.registry.Plugin")
        unknown = [h for h in vars(cls) if h in _HOOKLIKE and h not in HOOKS]
        if unknown:
            raise TypeError(f"plugin '{name}' defines unknown hook(s) {unknown}")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            warnings.warn(f"plugin '{name}' registered again by {cls.__module__}; the later one wins", stacklevel=2)
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


# Method names that look like hooks, used to catch typos such as `before_optimiser_step`.
_HOOKLIKE = {
    "accelerator_option",
    "after_prepared",
    "before_optimiser_step",
    "after_optimiser_step",
    "before_step",
    "after_step",
    "on_eval",
    "on_train_start",
    "on_step",
}


def discover() -> dict[str, type[Plugin]]:
    """Import the built-in `plugins` package modules and the entry-point plugins, once."""
    global _discovered
    if not _discovered:
        _discovered = True
        import launcher.plugins as builtin

        for mod in pkgutil.iter_modules(builtin.__path__):
            importlib.import_module(f"{builtin.__name__}.{mod.name}")
        for module in filter(None, os.environ.get("LAUNCHER_PLUGINS", "").split(",")):
            try:
                importlib.import_module(module.strip())
            except ImportError as err:
                raise LauncherError(f"LAUNCHER_PLUGINS names module '{module}', which cannot be imported: {err}") from None
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            try:
                ep.load()
            except Exception as err:  # a broken third-party plugin must not hide the others
                warnings.warn(f"could not load plugin entry point '{ep.name}' ({ep.value}): {err}", stacklevel=2)
    return dict(_REGISTRY)


def get_plugin_class(name: str) -> type[Plugin]:
    registry = discover()
    if name not in registry:
        raise LauncherError(
            f"Unknown plugin '{name}' under 'plugins:'.{did_you_mean(name, registry)} "
            f"Registered plugins: {', '.join(sorted(registry)) or 'none'} "
            "(python -m launcher --list-plugins shows their options)."
        )
    return registry[name]


def parse_options(name: str, raw: Optional[dict]) -> PluginOptions:
    cls = get_plugin_class(name)
    try:
        return cls.Options.model_validate(raw or {})
    except ValidationError as err:
        valid = list(cls.Options.model_fields)
        problems = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"])
            if e["type"] == "extra_forbidden":
                problems.append(
                    f"unknown option '{key}'.{did_you_mean(key, valid)} "
                    f"Valid options: {', '.join(valid) or 'none'}"
                )
            else:
                problems.append(f"'{key}' = {e.get('input')!r}: {e['msg']}")
        raise LauncherError(f"Plugin '{name}' options are invalid: " + "; ".join(problems) + ".") from None


# The support table's axes, and where a recipe falls on them. They live here, not in
# launcher/strategies/select.py, because a recipe's precision is a plugin's to set (amp): asking it
# from distributed.py made the two modules import each other.
PRECISIONS = ("fp32", "bf16", "fp16")
# Columns of the support table: DDP, DeepSpeed ZeRO stages, FSDP.
STRATEGIES = ("ddp", "zero0", "zero1", "zero2", "zero3", "fsdp")


def strategy_key(recipe) -> str:
    """'ddp', 'fsdp', or 'zero0'..'zero3' under DeepSpeed: the columns of the support table."""
    if recipe.distributed.strategy == "fsdp":
        return "fsdp"
    stage = recipe.distributed.stage
    return "ddp" if stage is None else f"zero{stage}"


def recipe_precision(recipe) -> str:
    """'fp32', or the precision a plugin of the recipe sets (Plugin.precision)."""
    for name, raw in recipe.plugins.items():
        precision = get_plugin_class(name).precision(parse_options(name, raw))
        if precision:
            return precision
    return "fp32"


def recipe_declares(recipe, what: str):
    """The first value a plugin of the recipe declares for `what` (accumulation_steps,
    clipping_norm), or None."""
    for name, raw in recipe.plugins.items():
        value = getattr(get_plugin_class(name), what)(parse_options(name, raw))
        if value is not None:
            return value
    return None


def support_keys(strategy: str, precision: str) -> list[str]:
    """The keys of Plugin.refused_under that apply, most specific first."""
    keys = [f"{strategy}/{precision}", strategy]
    if strategy.startswith("zero"):
        keys += [f"deepspeed/{precision}", "deepspeed"]
    return keys + [precision]


def validate_plugins(recipe) -> None:
    """Check every plugin's options and every combination before any process trains."""
    names = list(recipe.plugins)
    parsed = {name: parse_options(name, recipe.plugins[name]) for name in names}
    strategy, precision = strategy_key(recipe), recipe_precision(recipe)
    loss_changers: list[str] = []  # plugins with a criterion hook, in recipe order
    for name in names:
        cls = get_plugin_class(name)
        for other, reason in cls.incompatible.items():
            if other in parsed:
                raise LauncherError(f"Plugins '{name}' and '{other}' cannot run together: {reason}")
        if cls.replaces_loss and loss_changers:
            raise LauncherError(
                f"Plugin '{name}' replaces the training loss, which would silently drop what "
                f"{', '.join(repr(n) for n in loss_changers)} listed before it did{' to it' if len(loss_changers) == 1 else ''}. "
                f"List '{name}' before {', '.join(repr(n) for n in loss_changers)} under plugins: (the loss "
                "hooks are chained in recipe order).")
        if getattr(cls, "criterion", None) is not None:
            loss_changers.append(name)
        for other, reason in cls.listed_before.items():
            if other in parsed and names.index(other) < names.index(name):
                raise LauncherError(f"Plugin '{name}' must be listed before '{other}' under plugins: ({reason}). "
                                    "Swap the two entries.")
        refused = refusal(cls, strategy, precision)
        if refused:
            where = f"{strategy.replace('zero', 'DeepSpeed ZeRO-').replace('fsdp', 'FSDP')} with {precision}"
            raise LauncherError(f"Plugin '{name}' cannot run under {where}: {refused}. Remove plugins.{name}, "
                                "or choose another distributed.strategy / zero_stage.")
        reason = cls.check_recipe(recipe, parsed[name])
        if reason:
            raise LauncherError(f"Plugin '{name}' cannot run with this recipe: {reason}")
    # The resolved recipe (recipe.yaml, --check) shows every option, defaults filled in.
    recipe.plugins = {name: parsed[name].model_dump(mode="json") for name in names}


def refusal(cls: type[Plugin], strategy: str, precision: str) -> Optional[str]:
    """The reason `cls` declares it cannot run under this strategy and precision, if any."""
    return next((cls.refused_under[k] for k in support_keys(strategy, precision) if k in cls.refused_under), None)


def check_run_dir(recipe, run_dir) -> None:
    """Raise if any of the recipe's plugins says the recipe cannot continue in run_dir."""
    for name in recipe.plugins:
        reason = get_plugin_class(name).check_run_dir(recipe, parse_options(name, recipe.plugins[name]), run_dir)
        if reason:
            raise LauncherError(f"Run directory '{run_dir}': {reason}")


def build_plugins(recipe) -> "PluginSet":
    return PluginSet([get_plugin_class(n)(parse_options(n, recipe.plugins[n])) for n in recipe.plugins])


class PluginSet:
    """The recipe's plugins, in recipe order, and the two ways the loop calls them."""

    def __init__(self, plugins: list[Plugin]):
        self.plugins = plugins

    def __iter__(self):
        return iter(self.plugins)

    def call(self, hook: str, *args) -> None:
        """A notify hook: every plugin that defines it, in recipe order."""
        assert HOOKS[hook] == "notify", hook
        for plugin in self._implementing(hook):
            getattr(plugin, hook)(*args)

    def chain(self, hook: str, ctx, value, *args):
        """A transform hook: each plugin receives the previous plugin's result."""
        assert HOOKS[hook] == "transform", hook
        for plugin in self._implementing(hook):
            value = getattr(plugin, hook)(ctx, value, *args)
        return value

    def _implementing(self, hook: str) -> list[Plugin]:
        return [p for p in self.plugins if getattr(type(p), hook, None) is not None]

    def state_dict(self) -> dict[str, Any]:
        return {p.name: p.state_dict() for p in self.plugins}

    def load_state_dict(self, states: dict[str, Any]) -> None:
        for p in self.plugins:
            if p.name in states:
                p.load_state_dict(states[p.name])


def describe_plugins() -> str:
    """The text of `python -m launcher --list-plugins`."""
    lines = []
    for name, cls in sorted(discover().items()):
        doc = (cls.__doc__ or "").strip().splitlines()
        lines.append(f"{name}: {doc[0] if doc else ''}  [{cls.__module__}]")
        for field_name, field in cls.Options.model_fields.items():
            ann = field.annotation
            ann = ann.__name__ if isinstance(ann, type) else str(ann).replace("typing.", "")
            default = field.get_default(call_default_factory=True)
            desc = f"  # {field.description}" if field.description else ""
            lines.append(f"    {field_name}: {ann} = {default!r}{desc}")
        if not cls.Options.model_fields:
            lines.append("    (no options)")
        for other, reason in cls.incompatible.items():
            lines.append(f"    cannot run with '{other}': {reason}")
        for other, reason in cls.listed_before.items():
            lines.append(f"    must be listed before '{other}': {reason}")
    return "\n".join(lines)


def support_table() -> str:
    """The README's plugin x strategy x precision table, from the plugins' own declarations
    (refused_under, notes_under, precision): `python -m launcher --support-table`."""
    titles = {"ddp": "DDP", "fsdp": "FSDP", **{s: f"ZeRO-{s[-1]}" for s in STRATEGIES if s.startswith("zero")}}
    lines = ["| plugin | " + " | ".join(titles[s] for s in STRATEGIES) + " |",
             "|---|" + "---|" * len(STRATEGIES)]
    footnotes: list[str] = []

    def footnote(text: str) -> str:
        if text not in footnotes:
            footnotes.append(text)
        return f"[{footnotes.index(text) + 1}]"

    plugins = {name: cls for name, cls in sorted(discover().items())
               if not name.startswith(("test_", "bench_")) and cls.__module__.startswith("launcher.plugins.")}
    setters = [cls for cls in plugins.values() if cls.precision.__func__ is not Plugin.precision.__func__]
    # A precision the plugins that set it (amp) refuse under a strategy runs nowhere there.
    reachable = {strategy: [p for p in PRECISIONS if p == "fp32" or any(refusal(c, strategy, p) is None for c in setters)]
                 for strategy in STRATEGIES}
    for name, cls in plugins.items():
        sets_precision = cls in setters
        cells = []
        for strategy in STRATEGIES:
            runs = [p for p in reachable[strategy] if not (sets_precision and p == "fp32")
                    and refusal(cls, strategy, p) is None]
            refused = {refusal(cls, strategy, p) for p in PRECISIONS if refusal(cls, strategy, p)}
            marks = [footnote(f"`{name}`: refused: {r}") for r in sorted(refused)]
            note = next((cls.notes_under[k] for k in _note_keys(strategy) if k in cls.notes_under), None)
            if note:
                marks.append(footnote(f"`{name}`: {note}"))
            cells.append((" ".join(runs) if runs else "no") + (" " + " ".join(marks) if marks else ""))
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"{i}. {text}" for i, text in enumerate(footnotes, 1)]
    return "\n".join(lines)


def _note_keys(strategy: str) -> list[str]:
    return [strategy] + (["deepspeed"] if strategy.startswith("zero") else [])
