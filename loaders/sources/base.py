"""What every domain source is: a random-access, lazily opened, picklable sequence of samples."""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from onlinemix.loaders.transforms import Transform, collate


class SourceError(Exception):
    """Bad data in a source: the message names the file and the sample."""


class Source(abc.ABC):
    """One domain's samples, addressed by index in ``[0, len(source))``.

    Subclasses open their files on first read (not in ``__init__``) and drop
    open handles when pickled, so a source travels cheaply to DataLoader
    workers under both fork and spawn.
    """

    kind: ClassVar[str]  # the ``source:`` value that selects this class in a config
    options: ClassVar[frozenset[str]] = frozenset()  # extra config keys it accepts
    # Sharded sources: the sample count of each shard, in storage order (enables ``order: shards``).
    shard_sizes: np.ndarray | None = None

    def __init__(self, path: str | Path, transform: Transform):
        self.path = Path(path)
        self.transform = transform

    @classmethod
    def path_given(cls, path: Path, options: dict[str, Any]) -> bool:
        """Whether a config's ``path`` (with the domain's other keys) names something to read."""
        return path.exists()

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of samples."""

    @abc.abstractmethod
    def record(self, index: int) -> Any:
        """The raw record at ``index``, before the transform."""

    def describe(self, index: int) -> str:
        """How error messages name sample ``index`` (a line number, a shard member...)."""
        return f"sample {index}"

    def read_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Transformed samples at ``indices``, stacked field by field."""
        samples = []
        for index in map(int, indices):
            record = self.record(index)
            try:
                samples.append(self.transform(record))
            except KeyError as error:
                raise SourceError(f"{self.path}: {self.describe(index)} has no field {error.args[0]!r}") from None
            except Exception as error:
                raise SourceError(
                    f"{self.path}: {self.describe(index)}: transform {self.transform!r} failed: {error}"
                ) from error
        return collate(samples, str(self.path))

    def read_into(self, indices: np.ndarray, out: dict[str, np.ndarray], rows: np.ndarray | slice) -> None:
        """Write the samples at ``indices`` into ``out[field][rows]`` (sources override this to skip copies)."""
        for name, values in self.read_batch(indices).items():
            out[name][rows] = values

    def signature(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Each output field's per-sample shape and dtype, from reading sample 0."""
        return {name: (values.shape[1:], values.dtype.str) for name, values in self.read_batch(np.zeros(1)).items()}

    def __getstate__(self) -> dict[str, Any]:
        # Open files and memory maps are reopened lazily in the receiving process.
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_open")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


class ShardedSource(Source):
    """A source stored in shards: sample ``i`` is a sample of the shard whose range holds ``i``.

    Subclasses call ``_set_shards`` with each shard's sample count (storage
    order), which also makes the domain eligible for ``order: shards``.
    """

    def _set_shards(self, sizes: list[int]) -> None:
        self.shard_sizes = np.asarray(sizes, dtype=np.int64)
        self.shard_starts = np.cumsum(self.shard_sizes) - self.shard_sizes
        self._length = int(self.shard_sizes.sum())

    def __len__(self) -> int:
        return self._length

    def locate(self, index: int) -> tuple[int, int]:
        """``(shard number, sample number within the shard)`` of sample ``index``."""
        if not 0 <= index < self._length:
            raise SourceError(f"{self.path}: sample {index} out of range [0, {self._length})")
        shard = int(np.searchsorted(self.shard_starts, index, side="right")) - 1
        return shard, index - int(self.shard_starts[shard])
