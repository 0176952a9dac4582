"""Optional dependencies: import them, or say which widenets extra installs them.

The extras are those of ``pyproject.toml``: ``demo`` (scikit-learn, matplotlib),
``store`` (zarr), ``dask`` (dask.distributed, zarr) and ``gpytorch`` (GPyTorch).
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: The name to ``pip install`` for a module whose import name differs from it.
PACKAGES = {"sklearn": "scikit-learn", "distributed": "dask[distributed]"}


def require(module: str, extra: str, what: str) -> ModuleType:
    """Import and return ``module``, which ``what`` (a widenets module or argument) needs.

    If ``module`` (or the package it belongs to) is not installed, raise a
    ``ModuleNotFoundError`` (an ``ImportError``) whose message names the package and the
    command installing it, ``pip install 'widenets[extra]'``. A module that is installed
    but fails to import for another reason (one of its own dependencies missing) raises
    its own error unchanged.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        top = module.partition(".")[0]
        if error.name not in (module, top):
            raise
        package = PACKAGES.get(top, top)
        raise ModuleNotFoundError(
            f"{what} needs {package} (module {top!r}), which is not installed: install it "
            f"with pip install 'widenets[{extra}]' (or pip install '{package}')",
            name=top,
        ) from None
