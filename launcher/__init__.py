"""Image-classification training launcher: YAML recipes, WebDataset shards, timm models,
Accelerate, and every training trick as a registered plugin (see plugins/)."""

__version__ = "0.1.0"

# Importing the package registers the CIFAR WideResNets into timm's model registry.
from launcher import models as _models  # noqa: F401,E402
