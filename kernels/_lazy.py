"""Lazy re-export of backend functions, so a kernel family's module loads only when one of its ops is used."""

import importlib

# backend function -> module suffix that defines it
BACKEND_FUNCTIONS = {
    "gmm": "gmm", "tgmm": "gmm",
    "sort_by_expert": "sort", "gather_rows": "sort", "combine_rows": "sort", "combine_weight_grad": "sort",
}


def exporter(package: str):
    """A module ``__getattr__`` that resolves ``BACKEND_FUNCTIONS`` from ``package.<family>``."""
    def __getattr__(name):
        if name not in BACKEND_FUNCTIONS:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{BACKEND_FUNCTIONS[name]}"), name)
    return __getattr__
