"""Experiments: a ladder of tricks over seeds, grids and searches, each trial an ordinary run."""
