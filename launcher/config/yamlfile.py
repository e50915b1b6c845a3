"""Reading the YAML a user (or someone else's run directory) hands the launcher.

Two things PyYAML's `safe_load` gets wrong for recipes, fixed here for every reader (recipes,
overrides, run directories, experiment files):

- Numbers as people type them. PyYAML follows YAML 1.1, where a float needs a dot and a signed
  exponent, so `lr: 1e-3` and `5e-4` are strings. YAML 1.2 (and JSON) read them as numbers;
  this loader adds the 1.2 exponent form, nothing else (booleans stay `true`/`false`, so the
  schema's refusal of `hflip: true` as a probability is unchanged).
- Aliases. `a1: &a1 [*a0, *a0, ...]` nested ten deep is a 476-byte document that expands to
  billions of references, and `a: &a [*a]` refers to itself; anything that walks the result
  (validation, hashing, dumping) hangs or overflows. The node graph is measured before it is
  turned into Python objects, each node once: a self-reference, or a document that expands past
  MAX_EXPANDED_NODES, is refused. Written by hand: PyYAML has no limit of its own.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from launcher.errors import LauncherError

# A recipe is a few hundred nodes; merge keys (`<<: *defaults`) multiply that by little.
MAX_EXPANDED_NODES = 100_000


class _Refused(Exception):
    """The document's alias graph is unsafe to expand (message says why)."""


class RecipeLoader(yaml.SafeLoader):
    """yaml.SafeLoader + YAML 1.2 exponent floats + a bound on what aliases expand to."""

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            _check_expansion(node)
        return node


# YAML 1.2's float forms that 1.1 reads as strings: an exponent without a dot (1e-3, 5E4) or with
# an unsigned exponent (1.0e3). Tried after PyYAML's own int and float patterns.
RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def _check_expansion(root: yaml.Node) -> None:
    """Count the nodes the document expands to (an alias counts as a copy of what it names),
    visiting each node once; refuse cycles and documents over MAX_EXPANDED_NODES."""
    expanded: dict[int, int] = {}
    visiting: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in expanded:
            return expanded[key]
        if key in visiting:
            raise _Refused(f"an alias refers to the node that contains it (line {node.start_mark.line + 1}), "
                           "so the document has no end")
        visiting.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        visiting.discard(key)
        if total > MAX_EXPANDED_NODES:
            raise _Refused(f"its aliases expand to more than {MAX_EXPANDED_NODES:,} values (line "
                           f"{node.start_mark.line + 1}), far more than any recipe holds")
        expanded[key] = total
        return total

    size(root)


def load_yaml(text: str, what: str) -> Any:
    """Parse one YAML document; `what` names it in the error ("Recipe 'x.yaml'", "Override 'k=v'")."""
    try:
        return yaml.load(text, Loader=RecipeLoader)  # noqa: S506  (RecipeLoader is a SafeLoader)
    except _Refused as err:
        raise LauncherError(f"{what} is refused: {err}. Write the values out, or use fewer aliases.") from None
    except yaml.YAMLError as err:
        raise LauncherError(f"{what} is not valid YAML: {err}") from None
    except RecursionError:
        raise LauncherError(f"{what} is nested too deeply to be a recipe.") from None


def read_mapping_file(path, kind: str, example: str, holds: str) -> dict:
    """A YAML file the user named that must hold a mapping (a recipe, an experiment file): one
    paragraph for a folder, a missing file (with the nearest file there), not UTF-8, not YAML, not
    a mapping. `kind` is "Recipe" or "Experiment"; `holds` what the mapping holds."""
    from pathlib import Path

    from launcher.errors import did_you_mean

    path = Path(path)
    if path.is_dir():
        article = "an" if kind[0] in "AEIOU" else "a"
        raise LauncherError(f"'{path}' is a folder, not {article} {kind.lower()} file: give the path of a YAML "
                            f"file, e.g. {example}.")
    if not path.is_file():
        shipped = sorted(p.name for p in path.parent.glob("*.yaml")) if path.parent.is_dir() else []
        hint = did_you_mean(path.name, shipped) or (f" Files there: {', '.join(shipped)}." if shipped else "")
        raise LauncherError(f"{kind} file '{path}' does not exist.{hint}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LauncherError(f"{kind} '{path}' is not a text file (not UTF-8): give the path of a YAML file.") from None
    raw = load_yaml(text, f"{kind} '{path}'") or {}
    if not isinstance(raw, dict):
        raise LauncherError(f"{kind} '{path}' must be a YAML mapping of {holds}.")
    return raw
