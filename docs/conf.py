"""Sphinx configuration of the widenets documentation (``make docs``)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import widenets  # noqa: E402

project = "widenets"
author = "The widenets authors"
copyright = "2026, the widenets authors"
release = widenets.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
myst_enable_extensions = ["dollarmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
exclude_patterns = ["_build"]

# Broken references are errors: `make docs` runs with -W (warnings as errors) and -n
# (nitpicky: every cross-reference must resolve). Names from other projects' documentation
# (no intersphinx: the build needs no network) are listed here instead.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|np|numpy|scipy|sklearn|matplotlib|zarr|dask|distributed|tqdm)\..*"),
    (r"py:.*", r"(Tensor|Module|Generator|Figure|Axes|ArrayLike|Path|Client|PathLike)"),
    (r"py:.*", r"(collections\.abc|typing|os|pathlib|concurrent\.futures)\..*"),
    (r"py:.*", r"(Callable|Sequence|Iterable|Iterator|Mapping|Any|Literal|Self|TypeAlias)"),
    # NumPy-style parameter types of the scikit-learn estimators, written as prose
    (r"py:class", r"(default=.*|widenets layer|ndarray|array-like.*|of shape.*|\{.*|.*\}|[0-9.]+)"),
]

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autodoc_default_options = {"members": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = True
add_module_names = False

html_theme = "furo"
html_title = f"widenets {release}"
html_static_path = ["_static"]
html_theme_options = {"source_repository": "", "navigation_with_keys": True}


def skip_metadata_routing(app, what, name, obj, skip, options):
    """scikit-learn's generated ``set_*_request`` methods belong to its documentation."""
    if name.startswith("set_") and name.endswith("_request"):
        return True
    return None


def setup(app):
    app.connect("autodoc-skip-member", skip_metadata_routing)
