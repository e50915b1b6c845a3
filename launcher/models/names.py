"""Model names known without importing timm (6 s here), for `--check`: the launcher's WideResNets
(launcher/models/factory.py registers them) and the names timm's own model files register."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

# (depth, width) of the WideResNets registered as wrn{depth}_{width}.
WRN_SIZES = tuple((depth, width) for depth in (10, 16, 22, 28, 40) for width in (1, 2, 4, 8, 10, 12))

_REGISTERED = re.compile(r"^@register_model\s*\n(?:@[^\n]*\n)*def (\w+)\(", re.MULTILINE)


def known_without_timm() -> set[str]:
    """The WideResNets, and every name defined with `@register_model` in timm's model files, read
    as text (0.1 s; for timm 1.0.x exactly timm.list_models()). A file written another way only
    leaves its names to be asked of timm itself."""
    names = {f"wrn{depth}_{width}" for depth, width in WRN_SIZES}
    spec = importlib.util.find_spec("timm")  # finds timm without importing it
    for path in (Path(spec.submodule_search_locations[0]) / "models").glob("*.py") if spec else ():
        try:
            names.update(_REGISTERED.findall(path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError):
            pass
    return names
