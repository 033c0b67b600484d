"""The interpreter patches of :mod:`arfuse.testing.interpreter`, under the name the interpreted tests import."""
from arfuse.testing.interpreter import patch  # noqa: F401
