"""onlinemix.loaders: turning mixture weights into samples. Nothing here knows a mixing algorithm."""

from onlinemix.loaders.config import ConfigError, MixtureConfig
from onlinemix.loaders.dataset import MixedDataset
from onlinemix.loaders.loader import MixedLoader
from onlinemix.loaders.plan import PlanSpec, PlanState, StaticSchedule, StreamEnded
from onlinemix.loaders.sources import JsonlSource, Source, SourceError, TokenBinSource
from onlinemix.loaders.transforms import IGNORE_INDEX, ByteTokenizer, TokenWindow

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
