"""The commands that work on a finished run: evaluate, predict, export, report, lr_find."""
