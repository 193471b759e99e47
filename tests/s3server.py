"""A real S3 API server on loopback (moto's server mode, in a process of its own) for the object-storage tests
and benchmark: the client is the real s3fs/botocore stack, talking HTTP to a server that can be killed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class S3Server:
    """``start()`` a moto S3 server on a free loopback port, ``kill()`` it (SIGKILL: no goodbye), ``start()`` it
    again on the same port (empty: moto keeps its objects in memory). ``environment`` is what a client needs:
    the endpoint and dummy credentials, and botocore's own retries off so that the tests time onlinemix's."""

    def __init__(self) -> None:
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.environment = {
            **CREDENTIALS,
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}",
            "AWS_MAX_ATTEMPTS": "1",
        }

    def start(self) -> S3Server:
        command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError(f"the moto server exited with status {self.process.returncode}") from None
                time.sleep(0.05)
        raise RuntimeError("the moto server did not start in 30 s")

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def upload(self, folder: Path, bucket: str) -> None:
        """Create ``bucket`` and copy ``folder``'s files into it under their relative paths."""
        fs = filesystem()
        fs.mkdir(bucket)
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                fs.put_file(str(path), f"{bucket}/{path.relative_to(folder).as_posix()}")


def filesystem():
    """A fresh s3fs client of the current environment (fsspec otherwise hands back one made for an older server)."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    return s3fs.S3FileSystem(use_listings_cache=False)


def set_environment(server: S3Server) -> None:
    """Point this process's S3 clients at ``server`` (and forget those made for another)."""
    import s3fs

    os.environ.update(server.environment)
    s3fs.S3FileSystem.clear_instance_cache()
