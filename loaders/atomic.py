"""Writes a reader never sees half of: the old file or the new one, whatever kills the writer.

- ``atomic_output``: a temporary path beside the output to write a file or a folder into, renamed on success;
  what a killed writer left is removed by the next attempt once its process is gone;
- ``atomic_write``: a file written through a fresh temporary, flushed to disk, renamed over the old one;
- ``save_checkpoint``: ``torch.save`` through ``atomic_write``; ``load_checkpoint``: ``torch.load``, a file that
  cannot be read as a checkpoint being one line (``CheckpointError``) rather than a deep traceback.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO


def remove_path(path: Path) -> None:
    """Remove a file, a link or a folder, whichever ``path`` is (nothing if it is not there)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write a file or a folder into; rename it on success.

    Readers see either nothing (or the old version) or the complete new one, never a half-written
    output: an interrupted write leaves only the temporary ``.<name>.partial-<pid>``, which any later
    attempt removes once its process is gone (even after a SIGKILL). An existing ``path`` is replaced
    (callers that must not overwrite check before they start).
    """
    path = Path(path)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.partial-*"):
        pid = stale.name.rpartition("-")[2]
        if pid.isdigit() and not _alive(int(pid)):
            remove_path(stale)
    temporary = path.with_name(f".{path.name}.partial-{os.getpid()}")
    remove_path(temporary)
    try:
        yield temporary
    except BaseException:
        remove_path(temporary)
        raise
    if path.is_dir() and not path.is_symlink():  # a folder cannot be replaced in one rename
        previous = path.with_name(f".{path.name}.previous-{os.getpid()}")
        os.replace(path, previous)
        os.replace(temporary, path)
        remove_path(previous)
    else:
        os.replace(temporary, path)


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` through ``write(file)`` into a fresh temporary beside it (created exclusively, so no
    planted file or link is written through), flushed to disk, then renamed over ``path``. The temporary is
    removed whatever stops the write, Ctrl-C included."""
    path = Path(path)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def load_checkpoint(path: str | Path, map_location: Any = None) -> Any:
    """``torch.load(path)`` (every object type, as saved by ``save_checkpoint``); a file that is not there, or that
    is damaged so that it cannot be read, is a ``CheckpointError`` naming it. (What it holds is checked where it is
    loaded: ``OnlineMixing.load_state_dict`` and the rest check their digests.)"""
    import torch

    from onlinemix.loaders.state_digest import CheckpointError

    try:
        _check_zip(Path(path))
        return torch.load(path, map_location=map_location, weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except Exception as error:  # zip, pickle, storage and tensor errors: any of them means a damaged file
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise CheckpointError(
            f"{path} cannot be read as a checkpoint ({type(error).__name__}: {first[:200]}): it is damaged or not "
            "one; restore it from another copy"
        ) from None


def _check_zip(path: Path) -> None:
    """Refuse a damaged zip checkpoint (``torch.save``'s format) before ``torch.load`` reads it: a member that does
    not fit in the file, or a pickle (the checkpoint's structure: every size and key) whose CRC-32 fails. A damaged
    size there makes ``torch.load`` allocate gigabytes before it fails. The tensors' bytes are not read here (a
    model's can be gigabytes): the states onlinemix writes carry their own digests for those."""
    if not zipfile.is_zipfile(path):
        return  # a damaged zip is often no zip at all: torch.load says so itself, quickly
    size = path.stat().st_size
    with zipfile.ZipFile(path) as archive:
        for member in archive.infolist():
            if member.header_offset + member.compress_size > size or member.file_size > size + (1 << 20):
                raise ValueError(f"member {member.filename} claims {member.file_size:,} bytes in a {size:,}-byte file")
            if member.filename.endswith(".pkl"):
                with archive.open(member) as pickled:  # reading it whole checks its CRC-32
                    while pickled.read(1 << 20):
                        pass


def save_checkpoint(state: Any, path: str | Path) -> None:
    """``torch.save(state, path)``, atomically: a process killed while saving leaves the previous checkpoint
    whole (``torch.save`` alone leaves a truncated file that cannot be loaded)."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda file: torch.save(state, file))
