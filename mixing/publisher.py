"""The mixer's publishing thread: a GPU step's weights reach the loader without the training stream waiting.

``step()`` starts an asynchronous copy of the step's packet (the weights and what the host reports of them) into
pinned host memory and hands it here with a CUDA event; this thread waits for the event (in this thread only),
then calls ``publish(version, packet)``. A failure there is kept and raised on the trainer's next call
(``raise_failure``). On the CPU there is nothing to wait for and the mixer publishes in place.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import numpy as np
import torch


class Publisher:
    """Publishes device packets in order, off the training thread (started on the first ``submit``)."""

    def __init__(self, publish: Callable[[int, np.ndarray], None]):
        self.publish = publish
        self.failure: BaseException | None = None
        self._pending: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None

    def submit(self, version: int, packet: torch.Tensor) -> None:
        """Copy ``packet`` (on a CUDA device) to the host asynchronously; publish it once the copy is done."""
        host = torch.empty(packet.shape, dtype=packet.dtype, pin_memory=True)
        host.copy_(packet, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="onlinemix-publisher", daemon=True)
            self._thread.start()
        self._pending.put((version, host, done))

    def _loop(self) -> None:
        while True:
            version, host, done = self._pending.get()
            try:
                done.synchronize()  # waits in this thread only; training goes on
                self.publish(version, host.numpy())
            except BaseException as error:  # surfaced on the trainer's next call
                self.failure = error
            finally:
                self._pending.task_done()

    def flush(self) -> None:
        """Wait until every packet submitted is published."""
        if self._thread is not None:
            self._pending.join()

    def raise_failure(self) -> None:
        """Raise (once) what went wrong in a publication since the last call."""
        if self.failure is not None:
            failure, self.failure = self.failure, None
            raise failure
