"""Domain sources, one module each. ``SOURCES`` maps a config's ``source:`` value to its class."""

from onlinemix.loaders.sources.base import Source, SourceError
from onlinemix.loaders.sources.jsonl import JsonlSource
from onlinemix.loaders.sources.mds import MdsSource
from onlinemix.loaders.sources.tokenbin import TokenBinSource
from onlinemix.loaders.sources.wds import WebDatasetSource

SOURCES: dict[str, type[Source]] = {cls.kind: cls for cls in (TokenBinSource, JsonlSource, MdsSource, WebDatasetSource)}

__all__ = ["SOURCES", "JsonlSource", "MdsSource", "Source", "SourceError", "TokenBinSource", "WebDatasetSource"]
