"""onlinemix: a streaming data-mixing loader for PyTorch whose domain weights change while training runs.

The sample order is a pure function of ``(seed, batch index, weight history)``:
the same for any number of workers and ranks, exactly resumable, and
replayable from a recorded schedule. The public API::

    import onlinemix

    dataset = onlinemix.MixedDataset.from_config("mixture.yaml")   # static weights from the file
    loader = onlinemix.MixedLoader(dataset, num_workers=2)

    mixing = onlinemix.OnlineMixing.from_config("mixture.yaml", controller="odm")  # weights that move
    for batch in mixing:
        ...
        mixing.observe(per_sample_losses, batch)
        mixing.step()

Subpackages: ``onlinemix.loaders`` turns weights into samples (sources, the
plan, the weights channel, the dataset and loader, importance estimates);
``onlinemix.mixing`` decides the weights (controllers, the mixer, the
schedule log, trainer integrations).
"""

from onlinemix.loaders import ByteTokenizer, ConfigError, MixedDataset, MixedLoader, MixtureConfig, Source, SourceError
from onlinemix.loaders.atomic import load_checkpoint, save_checkpoint
from onlinemix.loaders.state_digest import CheckpointError
from onlinemix.mixing.controllers import (
    ADOController,
    ClusterBanditController,
    Controller,
    DGAController,
    DoReMiController,
    ODMController,
    ScheduledController,
    StaticController,
    gradient_alignment,
    neighbour_similarity,
)
from onlinemix.mixing.coreset import MiniBatchCoreset, output_gradients
from onlinemix.mixing.mixer import MixingError, OnlineMixer
from onlinemix.mixing.schedule_log import read_schedule, replay_schedule
from onlinemix.mixing.training import OnlineMixing, per_sample_loss

__version__ = "0.1.0"

__all__ = [
    "ADOController",
    "ByteTokenizer",
    "CheckpointError",
    "ClusterBanditController",
    "ConfigError",
    "Controller",
    "DGAController",
    "DoReMiController",
    "MiniBatchCoreset",
    "MixedDataset",
    "MixedLoader",
    "MixingError",
    "MixtureConfig",
    "ODMController",
    "OnlineMixer",
    "OnlineMixing",
    "ScheduledController",
    "Source",
    "SourceError",
    "StaticController",
    "__version__",
    "gradient_alignment",
    "load_checkpoint",
    "neighbour_similarity",
    "output_gradients",
    "per_sample_loss",
    "read_schedule",
    "replay_schedule",
    "save_checkpoint",
]
