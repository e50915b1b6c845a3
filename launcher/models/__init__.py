"""Models: timm's, and the CIFAR WideResNets registered into timm's registry (factory.py: creating
a recipe's model, pretrained weights offline, compiling), the model names known without importing
timm (names.py), and loading weight files safely (weights.py). Importing this package imports
neither torch nor timm."""
