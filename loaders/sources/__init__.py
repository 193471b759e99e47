"""Domain sources, one module each. ``SOURCES`` maps a config's ``source:`` value to its class."""

from loaders.sources.base import Source, SourceError
from loaders.sources.jsonl import JsonlSource
from loaders.sources.mds import MdsSource
from loaders.sources.tokenbin import TokenBinSource
from loaders.sources.wds import WebDatasetSource

SOURCES: dict[str, type[Source]] = {cls.kind: cls for cls in (TokenBinSource, JsonlSource, MdsSource, WebDatasetSource)}

__all__ = ["SOURCES", "JsonlSource", "MdsSource", "Source", "SourceError", "TokenBinSource", "WebDatasetSource"]
