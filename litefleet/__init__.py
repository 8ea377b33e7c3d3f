"""litefleet host tools: the ``litefleet`` command composes the converter and fleet parts."""

from agent import __version__

__all__ = ["__version__"]
