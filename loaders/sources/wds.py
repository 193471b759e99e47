"""WebDataset: ``.tar`` shards as written by ``webdataset.TarWriter`` / ``ShardWriter``.

A sample is the run of consecutive tar members that share a key, as
webdataset groups them: ``doc7.txt`` and ``doc7.json`` are the ``txt`` and
``json`` of sample ``doc7`` (the key is the name up to the first dot of its
last path part; the rest, lower-cased, is the extension). Members whose
names start with ``__`` and non-file members are ignored, as webdataset does.

**Random access.** Each shard's members are indexed once (one pass over the
tar headers, no data read) and the index is cached in the cache folder,
keyed by the shard's size and content digest (``files.file_stamp``), so a changed shard is re-indexed.
A sample is then one seek and one read per member.

**Why not the webdataset package's reader.** webdataset 1.0 (a dependency: shards are written with its
``TarWriter`` and tested against its own iteration) reads tars front to back only; an exact, resumable plan
needs sample ``i`` of a shard at once. Its indexed reader, ``wids`` (a separate package since), pickles a
``.index`` file beside each shard (read-only data fails, and a planted pickle runs code when loaded) and
needs every shard's sample count up front, which is what the indexing pass here computes. So the members are
indexed here, by webdataset's own grouping rules, and the index kept in the cache folder as JSON.

**Shard order** (``order: shards`` in the config): for stores where random
access is slow, each epoch reads the domain's shards in a shuffled order,
each front to back (see ``loaders/plan.py``), so every read continues where
the previous one stopped. Determinism, resume and replay hold exactly as in
sample order; batches are less mixed within the domain (consecutive samples
of a shard arrive together).

**Decoding** by extension (the part after the last dot): ``txt``/``text`` →
``str``; ``json`` → the parsed value; ``npy`` → ``numpy`` array; ``u16``,
``u32``, ``i32``, ``i64`` → little-endian token ids; anything else stays
``bytes``. The record handed to a transform is ``{"__key__": key, ext:
value, ...}``. Each sample's document is its ``field`` member: text for the
tokenizer, or token ids when it is an integer array (``json`` records give
their ``json_key``, default ``text``).

**Bad data.** A missing shard, a truncated tar (a member that runs past the
end of the file, or no end-of-archive marker), or a sample without ``field``
is an error naming the shard and sample. With ``on_bad: skip`` a truncated
shard keeps the samples that end before the cut, minus the last one (it may
have lost members), and the count of dropped samples is reported when the
source opens (``source.skipped``) — decided once, before planning, so the
mixture never changes silently.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
import warnings
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from tqdm import tqdm

from onlinemix.loaders.atomic import atomic_write
from onlinemix.loaders.cache.folder import cache_entry, cache_root
from onlinemix.loaders.checksums import file_stamp
from onlinemix.loaders.extras import require
from onlinemix.loaders.paths import FileHandles
from onlinemix.loaders.sources.base import ShardedSource, SourceError, document_text
from onlinemix.loaders.transforms import Transform

INDEX_VERSION = 1
FIELD_PREFERENCE = ("npy", "u16", "u32", "i32", "i64", "txt", "text", "json")  # the default ``field``, in order
_TOKEN_EXTENSIONS = {"u16": "<u2", "u32": "<u4", "i32": "<i4", "i64": "<i8"}
_BLOCK = 512  # tar block size
ON_BAD = ("error", "skip")


def split_name(name: str) -> tuple[str, str] | None:
    """``(key, extension)`` of a member name, as webdataset splits it (``None``: not part of a sample)."""
    directory, _, base = name.rpartition("/")
    if base.startswith("__") or "." not in base:
        return None
    stem, _, extension = base.partition(".")
    if not stem:
        return None
    return (f"{directory}/{stem}" if directory else stem), extension.lower()


def decode(extension: str, data: bytes) -> Any:
    """A member's value from its raw bytes, by the last part of its extension."""
    last = extension.rpartition(".")[2]
    if last in ("txt", "text"):
        return data.decode("utf-8")
    if last == "json":
        return json.loads(data)
    if last == "npy":
        return decode_npy(data)
    if last in _TOKEN_EXTENSIONS:
        return np.frombuffer(data, dtype=_TOKEN_EXTENSIONS[last])
    return data


# The header numpy writes for a plain array; anything else goes through np.load.
_NPY_HEADER = re.compile(rb"\{'descr': '([<>|=]?[a-z]\d+)', 'fortran_order': False, 'shape': \(([\d, ]*)\), *\}")


def decode_npy(data: bytes) -> np.ndarray:
    """An ``.npy`` member as an array (read-only, no copy).

    ``np.load`` parses the header with ``ast.literal_eval``, which costs more
    than the rest of a sample's read; the header of a plain C-order array is
    matched directly instead.
    """
    if data[:6] == b"\x93NUMPY" and data[6] in (1, 2, 3):
        start = 10 if data[6] == 1 else 12
        length = int.from_bytes(data[8:start], "little")
        match = _NPY_HEADER.match(data[start : start + length].strip())
        if match:
            shape = tuple(int(n) for n in match[2].split(b",") if n.strip())
            return np.frombuffer(data, dtype=match[1].decode(), offset=start + length).reshape(shape)
    return np.load(io.BytesIO(data), allow_pickle=False)


class ShardIndex:
    """Where every sample of one shard lives: its key and its members' extensions, offsets and sizes."""

    def __init__(self, arrays: dict[str, np.ndarray], cut: str | None = None):
        self.keys = arrays["keys"]  # (samples,) str
        self.first = arrays["first"]  # (samples + 1,) first member row of each sample, then the member count
        self.extensions = arrays["extensions"]  # (members,) str
        self.offsets = arrays["offsets"]  # (members,) byte offset of each member's data
        self.sizes = arrays["sizes"]  # (members,) bytes
        self.cut = cut  # where a truncated shard stops being readable (None: intact)

    def __len__(self) -> int:
        return len(self.keys)

    def arrays(self) -> dict[str, np.ndarray]:
        """The index as arrays, for the cache file."""
        return {name: getattr(self, name) for name in ("keys", "first", "extensions", "offsets", "sizes")}

    @classmethod
    def scan(cls, shard: Path) -> ShardIndex:
        """Read the tar headers of ``shard`` (not the data) and group members into samples.

        A truncated shard gives the samples before the cut, less the last one
        (it may have lost members), and ``cut`` says where it broke.
        """
        file_size = shard.stat().st_size
        keys: list[str] = []
        first: list[int] = []
        extensions: list[str] = []
        offsets: list[int] = []
        sizes: list[int] = []
        end = 0  # where the last complete member's padded data ends
        cut = None
        try:
            with tarfile.open(shard, "r:") as tar:
                for member in tar:
                    if member.offset_data + member.size > file_size:
                        cut = f"in member {member.name!r}"
                        break
                    end = member.offset_data + -(-member.size // _BLOCK) * _BLOCK
                    parts = split_name(member.name) if member.isfile() else None
                    if parts is None:
                        continue
                    key, extension = parts
                    if not keys or keys[-1] != key:
                        keys.append(key)
                        first.append(len(offsets))
                    elif extension in extensions[first[-1] :]:
                        raise SourceError(f"{shard}: sample {key!r} has two members with extension {extension!r}")
                    extensions.append(extension)
                    offsets.append(member.offset_data)
                    sizes.append(member.size)
        except tarfile.ReadError as error:
            if end == 0:
                raise SourceError(f"{shard}: not a tar file ({error})") from None
            cut = f"after byte {end} ({error})"
        # An intact tar ends with two zero blocks after its last member.
        if cut is None and (file_size < end + 2 * _BLOCK or _nonzero(shard, end, 2 * _BLOCK)):
            cut = f"after byte {end} (no end-of-archive marker)"
        stop = len(offsets)
        if cut is not None and keys:
            keys.pop()
            stop = first.pop()
        arrays = {
            "keys": np.array(keys, dtype=str),
            "first": np.array([*first, stop], dtype=np.int64),
            "extensions": np.array(extensions[:stop], dtype=str),
            "offsets": np.array(offsets[:stop], dtype=np.int64),
            "sizes": np.array(sizes[:stop], dtype=np.int64),
        }
        return cls(arrays, cut)

    @classmethod
    def load(cls, shard: Path, cache_dir: str | Path | None = None) -> ShardIndex:
        """The index of ``shard``, from the cache when one matches the shard, else scanned (and cached)."""
        cache = cache_entry(cache_root(cache_dir), "wds-index", [INDEX_VERSION, file_stamp(shard)])
        cache = cache.with_suffix(".npz")
        if cache.exists():
            try:
                with np.load(cache, allow_pickle=False) as stored:
                    arrays = {name: stored[name] for name in stored.files if name != "cut"}
                    return cls(arrays, str(stored["cut"]) or None)
            except (ValueError, OSError, KeyError):
                pass  # unreadable cache: rescan
        index = cls.scan(shard)
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(cache, lambda file: np.savez(file, cut=np.array(index.cut or ""), **index.arrays()))
        except OSError:
            pass  # an unwritable cache folder: the index stays in memory for this process
        return index


def _nonzero(path: Path, offset: int, length: int) -> bool:
    with open(path, "rb") as file:
        file.seek(offset)
        return any(file.read(length))


def expand_shards(path: Path) -> list[Path]:
    """The shards a config's ``path`` names: a ``.tar`` file, a folder of them, or a brace pattern."""
    braceexpand = require("braceexpand", "a webdataset domain").braceexpand

    if "{" in path.name:
        return [Path(p) for p in braceexpand(str(path))]
    if path.is_dir():
        return sorted(path.glob("*.tar"))
    return [path]


class WebDatasetSource(ShardedSource):
    """The samples of WebDataset ``.tar`` shards (see the module docstring)."""

    kind = "webdataset"
    options: ClassVar[dict[str, type]] = {"field": str, "json_key": str, "on_bad": str}

    def __init__(
        self,
        path: str | Path,
        field: str | None = None,
        json_key: str = "text",
        on_bad: str = "error",
        transform: Transform | None = None,
        cache_dir: str | Path | None = None,
    ):
        super().__init__(Path(path), transform)
        if on_bad not in ON_BAD:
            raise ValueError(f"on_bad must be one of {ON_BAD}, got {on_bad!r}")
        self.shards = expand_shards(self.path)
        if not self.shards:
            raise SourceError(f"{self.path}: no .tar shards")
        missing = [shard for shard in self.shards if not shard.is_file()]
        if missing:
            raise SourceError(
                f"{self.path}: shard not found: {missing[0]}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
        self.indices = []
        self.skipped: dict[str, str] = {}  # shard -> where it was cut, for shards read only in part
        progress = tqdm(self.shards, desc=f"indexing {self.path.name}", unit="shard", disable=len(self.shards) < 16)
        for shard in progress:
            index = ShardIndex.load(shard, cache_dir)
            if index.cut is not None:
                if on_bad == "error":
                    raise SourceError(
                        f"{shard}: truncated tar, cut {index.cut} (set on_bad: skip to keep the samples before it)"
                    )
                self.skipped[str(shard)] = index.cut
            self.indices.append(index)
        if self.skipped:
            warnings.warn(
                f"{self.path}: {len(self.skipped)} truncated shard(s) read only up to the cut (last partial sample "
                f"dropped): " + "; ".join(f"{shard} cut {cut}" for shard, cut in self.skipped.items()),
                stacklevel=2,
            )
        self._set_shards([len(index) for index in self.indices])
        self.json_key = json_key
        self.field = field or self._default_field()
        self._files = FileHandles(buffering=0)  # one read per member: a buffer would read ahead for nothing

    def _default_field(self) -> str:
        for index in self.indices:
            if len(index):
                present = set(index.extensions[index.first[0] : index.first[1]])
                for extension in FIELD_PREFERENCE:
                    if extension in present:
                        return extension
                raise SourceError(
                    f"{self.path}: cannot tell which member holds the document (sample {index.keys[0]!r} has "
                    f"{sorted(present)}); set field: to one of them"
                )
        return FIELD_PREFERENCE[0]

    def describe(self, index: int) -> str:
        shard, row = self.locate(index)
        return f"shard {self.shards[shard].name}, sample {str(self.indices[shard].keys[row])!r} (#{row})"

    def record(self, index: int) -> dict[str, Any]:
        shard, row = self.locate(index)
        shard_index = self.indices[shard]
        file = self._files.get(self.shards[shard])
        record: dict[str, Any] = {"__key__": str(shard_index.keys[row])}
        for member in range(shard_index.first[row], shard_index.first[row + 1]):
            file.seek(int(shard_index.offsets[member]))
            data = file.read(int(shard_index.sizes[member]))
            extension = str(shard_index.extensions[member])
            if len(data) != shard_index.sizes[member]:
                raise SourceError(
                    f"{self.path}: {self.describe(index)}: member {extension!r} is cut short "
                    "(the shard changed after it was indexed?)"
                )
            try:
                record[extension] = decode(extension, data)
            except (ValueError, UnicodeDecodeError) as error:
                raise SourceError(
                    f"{self.path}: {self.describe(index)}: cannot decode {extension!r}: {error}"
                ) from None
        if self.field not in record:
            raise SourceError(
                f"{self.path}: {self.describe(index)} has no {self.field!r} member (it has {sorted(record)[1:]})"
            )
        document = record[self.field]
        if isinstance(document, dict):
            if self.json_key not in document:
                raise SourceError(f"{self.path}: {self.describe(index)}: its json has no key {self.json_key!r}")
            document = document[self.json_key]
        record["document"] = document
        return record

    # -- documents -----------------------------------------------------------------

    def documents(self, progress=None):
        for number, shard in enumerate(self.shards):
            start = int(self.shard_starts[number])
            for row in range(len(self.indices[number])):
                document = self.record(start + row)["document"]
                if isinstance(document, str):
                    yield document
                elif isinstance(document, np.ndarray) and document.dtype.kind in "iu" and document.ndim == 1:
                    yield document.astype(np.int64)
                else:
                    raise SourceError(
                        f"{self.path}: {self.describe(start + row)}: its {self.field!r} member is a "
                        f"{type(document).__name__}, not text or a 1-d array of token ids"
                    )
            if progress is not None:
                progress(shard.stat().st_size)

    def input_bytes(self) -> int:
        return sum(shard.stat().st_size for shard in self.shards)

    def input_files(self) -> list[Path]:
        return list(self.shards)

    def fingerprint(self) -> dict:
        shards = [file_stamp(shard) for shard in self.shards]
        return {"kind": self.kind, "shards": shards, "field": self.field, "json_key": self.json_key}

    def text(self, index: int, field: str = "text") -> str:
        return document_text(self.record(index)["document"])

    def read_into(self, indices: np.ndarray, out: dict[str, np.ndarray], rows: np.ndarray | slice) -> None:
        # Read in storage order (sequential within a shard), then put each sample in its row.
        order = np.argsort(indices, kind="stable")
        if isinstance(rows, slice):
            rows = np.arange(len(next(iter(out.values()))))[rows]
        for name, values in self.read_batch(np.asarray(indices)[order]).items():
            out[name][rows[order]] = values
