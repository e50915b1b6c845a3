"""Image-classification training launcher: YAML recipes, WebDataset shards, timm models,
Accelerate, and every training trick as a registered plugin (see plugins/)."""

import sys

__version__ = "0.1.0"


def _register_wide_resnets() -> None:
    from launcher.models import factory  # noqa: F401  (registers wrn{depth}_{width} into timm's registry)


# Importing the package registers the CIFAR WideResNets into timm's model registry, but without
# importing timm (6-7 s) itself: commands such as `--help` need no model. If timm is not loaded
# yet, the registration runs right after it is.
if "timm" in sys.modules:
    _register_wide_resnets()
else:
    from launcher.after_import import call_after_import

    call_after_import("timm", _register_wide_resnets)
