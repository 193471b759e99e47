"""Domain sources, one module each. ``SOURCES`` maps a config's ``source:`` value to its class."""

from loaders.sources.base import Source, SourceError
from loaders.sources.jsonl import JsonlSource
from loaders.sources.tokenbin import TokenBinSource

SOURCES: dict[str, type[Source]] = {cls.kind: cls for cls in (TokenBinSource, JsonlSource)}

__all__ = ["SOURCES", "JsonlSource", "Source", "SourceError", "TokenBinSource"]
