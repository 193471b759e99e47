"""Per-domain statistics kept on the training device, with no host synchronisation.

Everything here is fixed-size tensor arithmetic: ``index_add_`` into buffers
of length ``k``, ``torch.where`` instead of branches, so a training step never
waits for the host. Problems that would need a look at the values (a NaN loss,
a domain id out of range) are counted on the device instead; the mixer reads
the counters together with the weights, after the asynchronous copy.
"""

from __future__ import annotations

import torch


def accumulate(
    values: torch.Tensor,
    domains: torch.Tensor,
    mask: torch.Tensor | None,
    sums: torch.Tensor,
    counts: torch.Tensor,
    problems: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch into the buffers: a pure function of tensors, so ``torch.compile`` can fuse it whole."""
    num_domains = sums.shape[0]
    values = values.float()
    if mask is not None:
        mask = mask.to(values.dtype)
        dims = tuple(range(1, values.ndim))
        tokens = mask.sum(dim=dims)
        values = torch.where(mask > 0, values, 0.0).sum(dim=dims) / tokens.clamp(min=1)
        present = tokens > 0
    else:
        present = torch.ones_like(values, dtype=torch.bool)
    finite = torch.isfinite(values)
    valid = (domains >= 0) & (domains < num_domains)
    keep = present & finite & valid
    index = torch.where(valid, domains, 0).long()
    sums = sums.index_add(0, index, torch.where(keep, values, 0.0))
    counts = counts.index_add(0, index, keep.float())
    problems = problems + torch.stack([(present & ~finite).sum(), (~valid).sum()]).float()
    return sums, counts, problems


class DomainStats:
    """Sums and counts of a per-sample signal by domain since the last ``take()``.

    ``compile``: ``False`` (eager), ``True`` (``torch.compile`` with its default
    backend, fusing the accumulation into one kernel on GPU) or a backend name.
    """

    def __init__(self, num_domains: int, device: torch.device | str | None = None, compile: bool | str = False):
        self.num_domains = num_domains
        self.sums = torch.zeros(num_domains, dtype=torch.float32, device=device)
        self.counts = torch.zeros(num_domains, dtype=torch.float32, device=device)
        # [non-finite values skipped, out-of-range domain ids skipped], since creation
        self.problems = torch.zeros(2, dtype=torch.float32, device=device)
        self._accumulate = accumulate
        if compile:
            backend = "inductor" if compile is True else compile
            self._accumulate = torch.compile(accumulate, fullgraph=True, dynamic=False, backend=backend)

    def add(self, values: torch.Tensor, domains: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add per-sample ``values`` (or per-token, with ``mask`` of the same shape) of ``domains``."""
        if domains.ndim != 1:
            raise ValueError(f"domains must be a vector of domain ids, got shape {tuple(domains.shape)}")
        if values.shape[0] != domains.shape[0] or (mask is None and values.ndim != 1):
            raise ValueError(
                f"values of shape {tuple(values.shape)} do not match domains of shape {tuple(domains.shape)} "
                "(per-token values need a mask of the same shape)"
            )
        if mask is not None and mask.shape != values.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} differs from values shape {tuple(values.shape)}")
        self.sums, self.counts, self.problems = self._accumulate(
            values.detach(), domains, mask, self.sums, self.counts, self.problems
        )

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(means, present)`` since the last take, then reset. Absent domains have mean 0."""
        present = self.counts > 0
        means = self.sums / self.counts.clamp(min=1)
        self.sums = torch.zeros_like(self.sums)
        self.counts = torch.zeros_like(self.counts)
        return means, present


def ema(previous: torch.Tensor, new: torch.Tensor, present: torch.Tensor, decay: float) -> torch.Tensor:
    """Exponential moving average that leaves domains absent from the batch unchanged."""
    return torch.where(present, decay * previous + (1 - decay) * new, previous)
