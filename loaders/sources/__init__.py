"""Domain sources, one module each. ``SOURCES`` maps a config's ``source:`` value to its class.

``tokenbin`` and ``megatron`` are token ids read as they are; every other built-in is a ``DocumentSource``,
tokenized once into a cached token stream (``TokenizedSource``) unless a ``transform`` reads its records.
"""

from onlinemix.loaders.sources.base import DocumentSource, Source, SourceError
from onlinemix.loaders.sources.hf import HFDatasetSource
from onlinemix.loaders.sources.jsonl import JsonlSource
from onlinemix.loaders.sources.litdata import LitDataSource, LitDataTokens
from onlinemix.loaders.sources.mds import MdsSource
from onlinemix.loaders.sources.megatron import MegatronSource
from onlinemix.loaders.sources.parquet import ParquetSource
from onlinemix.loaders.sources.text import TextSource
from onlinemix.loaders.sources.tokenbin import TokenBinSource
from onlinemix.loaders.sources.tokenized import TokenizedSource
from onlinemix.loaders.sources.wds import WebDatasetSource

TOKEN_IDS = (TokenBinSource, MegatronSource)  # read as they are
DOCUMENTS = (JsonlSource, TextSource, ParquetSource, HFDatasetSource, MdsSource, WebDatasetSource, LitDataSource)
SOURCES: dict[str, type[Source]] = {cls.kind: cls for cls in (*TOKEN_IDS, *DOCUMENTS)}

__all__ = [
    "SOURCES",
    "DocumentSource",
    "HFDatasetSource",
    "JsonlSource",
    "LitDataSource",
    "LitDataTokens",
    "MdsSource",
    "MegatronSource",
    "ParquetSource",
    "Source",
    "SourceError",
    "TextSource",
    "TokenBinSource",
    "TokenizedSource",
    "WebDatasetSource",
]
