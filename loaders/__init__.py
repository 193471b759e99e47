"""onlinemix.loaders: turning mixture weights into samples. Nothing here knows a mixing algorithm."""

from loaders.config import ConfigError, MixtureConfig
from loaders.dataset import MixedDataset
from loaders.loader import MixedLoader
from loaders.plan import PlanSpec, PlanState, StaticSchedule, StreamEnded
from loaders.sources import JsonlSource, Source, SourceError, TokenBinSource
from loaders.transforms import IGNORE_INDEX, ByteTokenizer, TokenWindow

__all__ = [
    "IGNORE_INDEX",
    "ByteTokenizer",
    "ConfigError",
    "JsonlSource",
    "MixedDataset",
    "MixedLoader",
    "MixtureConfig",
    "PlanSpec",
    "PlanState",
    "Source",
    "SourceError",
    "StaticSchedule",
    "StreamEnded",
    "TokenBinSource",
    "TokenWindow",
]
