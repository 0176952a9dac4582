"""``widenets.experiments``: the lazy-training experiment under its public name.

The experiment is an application of the library and lives in
:mod:`widenets.apps.lazy`; this module only keeps the public name
``widenets.experiments.lazy_training`` (and the rest of that module) working. ``import
widenets`` does not import it: ``widenets.experiments`` is loaded on first use.
"""

from .apps.lazy import *  # noqa: F403
from .apps.lazy import __all__  # noqa: F401
