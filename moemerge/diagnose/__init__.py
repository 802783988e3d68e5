"""Diagnostics: how far candidate models' routing and loss are from each source on its domain's held-out text.

`metrics` (agreement, exact match, KL, expert load of one layer), `evaluate` (runs the models layer by
layer and builds the report; `diagnose` is the entry point), `report` (report.json, report.md, the
headline table for model cards), `plots` (PNG figures), `options` (`DiagnoseOptions`, torch-free).
"""
