"""onlinemix.loaders: turning mixture weights into samples. Nothing here knows a mixing algorithm."""

from onlinemix.loaders.config import ConfigError, MixtureConfig
from onlinemix.loaders.dataset import MixedDataset
from onlinemix.loaders.loader import MixedLoader
from onlinemix.loaders.plan import PlanSpec, PlanState, StaticSchedule, StreamEnded
from onlinemix.loaders.sources import (
    DocumentSource,
    HFDatasetSource,
    JsonlSource,
    MdsSource,
    ParquetSource,
    Source,
    SourceError,
    TextSource,
    TokenBinSource,
    TokenizedSource,
    WebDatasetSource,
)
from onlinemix.loaders.tokenizers import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer
from onlinemix.loaders.transforms import IGNORE_INDEX, TokenWindow

__all__ = [
    "IGNORE_INDEX",
    "ByteTokenizer",
    "ConfigError",
    "DocumentSource",
    "HFDatasetSource",
    "HFTokenizer",
    "JsonlSource",
    "MdsSource",
    "MixedDataset",
    "MixedLoader",
    "MixtureConfig",
    "ParquetSource",
    "PlanSpec",
    "PlanState",
    "Source",
    "SourceError",
    "StaticSchedule",
    "StreamEnded",
    "TextSource",
    "TokenBinSource",
    "TokenWindow",
    "TokenizedSource",
    "Tokenizer",
    "WebDatasetSource",
    "load_tokenizer",
]
