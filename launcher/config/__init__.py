"""Recipes and experiment-free configuration: the typed schema, overrides, YAML reading."""
