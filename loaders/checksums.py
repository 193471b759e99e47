"""What onlinemix knows a file by: its content, not its path or modification time.

- ``file_stamp`` / ``content_digest``: what a cache is keyed by: a file's size and a digest of its content
  (``touch``, ``cp -p`` and ``rsync -t`` neither invalidate nor fool it), read in sampled blocks so that the
  key of a TB corpus costs a few hundred KiB of reads per file;
- ``full_digest``: the whole file's digest, what ``verify`` compares a cache's record with;
- ``chunk_checksums`` / ``bad_chunk``: CRC-32 per 16 MiB chunk of a file a cache wrote or scanned, so that a
  flipped byte is found by ``onlinemix verify`` (or at every open, with ``verify: sampled`` / ``full``).

Local files and objects alike (``storage``).
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Sequence

from onlinemix.loaders.storage import StoragePath, open_input, read_ranges

WHOLE_FILE_BYTES = 256 << 10  # files up to this size are hashed whole
SAMPLED_EDGE_BYTES = 64 << 10  # larger ones: their first and last 64 KiB...
SAMPLED_BLOCKS, SAMPLED_BLOCK_BYTES = 32, 4 << 10  # ...and 32 blocks of 4 KiB spread evenly between
CHECKSUM_CHUNK = 16 << 20  # bytes per CRC-32 of chunk_checksums
VERIFY = ("lengths", "sampled", "full")  # what opening a cache or a token-bin file checks (a mixture's ``verify``)


def content_digest(path: StoragePath) -> str:
    """A digest of ``path``'s size and content (BLAKE2b, 128 bits), at a bounded cost per file.

    Files up to 256 KiB are hashed whole. Larger ones are hashed in samples: their first and last 64 KiB and
    32 blocks of 4 KiB spread evenly between (at most 256 KiB read, whatever the file's size). The trade-off:
    every change of size, and every same-size edit of a small file, changes the digest; a same-size edit of
    a large file that touches no sampled block does not. ``onlinemix verify`` (and ``verify: full``) hash
    inputs whole to find those. Modification times play no part: a touched file keeps its digest, a restored
    mtime hides nothing.
    """
    size = path.stat().st_size
    digest = hashlib.blake2b(str(size).encode(), digest_size=16)
    if size <= WHOLE_FILE_BYTES:
        ranges = [(0, size)]
    else:
        last = size - SAMPLED_EDGE_BYTES
        inner = [int(x) for x in _spread(SAMPLED_EDGE_BYTES, last - SAMPLED_BLOCK_BYTES)]
        ranges = [(0, SAMPLED_EDGE_BYTES), *((x, x + SAMPLED_BLOCK_BYTES) for x in inner), (last, size)]
    for part in read_ranges(path, ranges) if size else []:
        digest.update(part)
    return digest.hexdigest()


def _spread(low: int, high: int) -> list[int]:
    """``SAMPLED_BLOCKS`` offsets evenly spread over ``[low, high]`` (fewer where the range is small)."""
    if high <= low:
        return []
    step = (high - low) / max(1, SAMPLED_BLOCKS - 1)
    return sorted({low + round(i * step) for i in range(SAMPLED_BLOCKS)})


def full_digest(path: StoragePath) -> str:
    """BLAKE2b (128 bits) of the whole file: what ``onlinemix verify`` compares with a cache's record."""
    digest = hashlib.blake2b(digest_size=16)
    with open_input(path) as file:
        while block := file.read(CHECKSUM_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def file_stamp(path: StoragePath) -> list:
    """What a cache records of an input file to know it again: ``[size, content digest]``. Not its path: the
    same bytes under another path (a copy on another node, a moved folder, an object in a bucket) are the
    same data."""
    return [path.stat().st_size, content_digest(path)]


def chunk_checksums(path: StoragePath, chunks: Sequence[int] | None = None) -> list[int]:
    """CRC-32 of each ``CHECKSUM_CHUNK``-byte chunk of ``path`` (or of the chunks numbered ``chunks`` only)."""
    size = path.stat().st_size
    numbers = range(-(-size // CHECKSUM_CHUNK)) if chunks is None else chunks
    sums = []
    with open_input(path) as file:
        for number in numbers:
            file.seek(number * CHECKSUM_CHUNK)
            sums.append(zlib.crc32(file.read(CHECKSUM_CHUNK)))
    return sums


def bad_chunk(path: StoragePath, expected: Sequence[int], how: str) -> int | None:
    """The first chunk of ``path`` whose CRC-32 is not ``expected``'s (``how``: ``"full"`` checks every chunk,
    ``"sampled"`` the first, the last and one in the middle), or ``None`` when they all match."""
    if how == "full":
        chunks = list(range(len(expected)))
    else:
        chunks = sorted({0, len(expected) // 2, len(expected) - 1}) if expected else []
    for number, crc in zip(chunks, chunk_checksums(path, chunks)):
        if crc != expected[number]:
            return number
    return None
