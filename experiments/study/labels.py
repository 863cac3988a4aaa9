"""Names and colours of the study's methods in tables and figures (MNIST-1D and real MNIST)."""

from __future__ import annotations

LABELS = {
    "sgd": "SGD",
    "sgd+skeleton": "SGD + skeleton init",
    "gsgd": "G-SGD",
    "path-sgd": "Path-SGD",
    "adam": "Adam",
    "gadam": "GAdam",
    "adamw": "AdamW (wd 0.01)",
    "gadamw": "GAdamW (wd 0.01)",
    "adam+skeleton": "Adam + skeleton init",
    "adamw+skeleton": "AdamW (wd 0.01) + skeleton init",
    "gsgd-heuristic": "G-SGD, authors' BN heuristic",
    "gsgd-exact": "G-SGD, exact BN mode",
}
COLOURS = {
    "gsgd": "tab:red",
    "sgd": "tab:blue",
    "sgd+skeleton": "tab:green",
    "path-sgd": "tab:purple",
    "adam": "tab:cyan",
    "gadam": "tab:orange",
    "adamw": "tab:gray",
    "gadamw": "tab:brown",
    "adam+skeleton": "tab:olive",
    "adamw+skeleton": "tab:pink",
    "gsgd-heuristic": "tab:purple",
    "gsgd-exact": "tab:red",
}
