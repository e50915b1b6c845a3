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
