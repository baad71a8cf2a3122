"""Runners for the parity fixture kinds, one function per kind.

A runner takes ``(case, folder)`` -- the manifest entry and the folder holding its files -- builds
everything from ``case["config"]``, loads ``case["files"]`` through the library's own loaders, feeds
the case's inputs and returns ``{output_name: tensor}``. Runners register with ``@register(kind)``.
The modules below are imported for their registrations.
"""

from pathlib import Path

from safetensors.torch import load_file

RUNNERS = {}


def register(kind):
    def decorate(fn):
        RUNNERS[kind] = fn
        return fn

    return decorate


def case_inputs(case, folder: Path) -> dict:
    return load_file(str(folder / case["files"]["inputs"]))


def case_file(case, folder: Path, key: str) -> Path:
    return folder / case["files"][key]


def load_all_runners():
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
    return RUNNERS

