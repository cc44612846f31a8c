"""Renamed `infmoe.evaluation.routing_report`: this name shadowed the standard library's
`inspect`. Kept only so that ``from infmoe.evaluation.inspect import inspect_model``, as
docs/inspect.md showed it before the rename, still works; it warns once. Remove it with
the other old names."""

import sys

from infmoe.deprecation import renamed
from infmoe.evaluation import routing_report

renamed("infmoe.evaluation.inspect", "infmoe.evaluation.routing_report", "the module")
sys.modules[__name__] = routing_report  # the same module object: every name, private ones too
