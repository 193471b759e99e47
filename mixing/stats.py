"""Per-domain statistics kept on the training device, with no host synchronisation.

Everything here is fixed-size tensor arithmetic into one table updated in
place: each sample is routed to a column (its domain, or a column that
counts a problem) and two ``scatter_add_`` calls add its value and a count.
Problems that would need a look at the values (a NaN loss, a domain id out
of range) are counted on the device instead; the mixer reads the counters
together with the weights, after the asynchronous copy. The number of operations is what
costs: on a CPU each is a few microseconds of dispatch whatever its size, on
a GPU each is a kernel launch.
"""

from __future__ import annotations

import torch


def accumulate_(
    sums: torch.Tensor,
    counts: torch.Tensor,
    values: torch.Tensor,
    domains: torch.Tensor,
    mask: torch.Tensor | None,
    ones: torch.Tensor,
) -> None:
    """One batch into the ``sums`` and ``counts`` rows of the table, in place (``ones``: as many as samples).

    Column ``1 + d`` holds domain ``d``. The others catch what must not be
    averaged: column 0 negative ids and column ``k + 1`` ids ``>= k`` (the
    clamp puts them there), ``k + 2`` non-finite values (they add 0 to the
    sums there), ``k + 3`` samples with no unmasked token. (Column ``k + 4``
    counts weight vectors the controller rejected, see ``DomainStats.reject``.)
    A pure function of tensors, so ``torch.compile`` can fuse it whole and a
    CUDA graph capture it.
    """
    k = sums.shape[0] - 5
    if mask is not None:
        mask = mask.to(values.dtype)
        dims = tuple(range(1, values.ndim))
        tokens = mask.sum(dim=dims)
        values = torch.where(mask > 0, values, 0.0).sum(dim=dims) / tokens.clamp(min=1)
    if values.dtype != sums.dtype:
        values = values.to(sums.dtype)
    finite = torch.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    column = (domains + 1).clamp_(0, k + 1)
    column.masked_fill_(finite != values, k + 2)
    if mask is not None:
        column.masked_fill_(tokens == 0, k + 3)
    sums.scatter_add_(0, column, finite)
    counts.scatter_add_(0, column, ones)


class DomainStats:
    """Sums and counts of a per-sample signal by domain since the last ``take()``.

    ``compile``: ``False`` (eager), ``True`` (``torch.compile`` with its default
    backend, fusing the accumulation into one kernel on GPU) or a backend name.
    """

    def __init__(self, num_domains: int, device: torch.device | str | None = None, compile: bool | str = False):
        self.num_domains = num_domains
        self.table = torch.zeros(2, num_domains + 5, dtype=torch.float32, device=device)
        # Views made once (making a view costs a few µs too); the table is only ever updated in place.
        self.window = self.table[:, 1 : num_domains + 1]  # (2, k) sums and counts since the last take
        self._sums, self._counts = self.window.unbind(0)
        self._all_sums, self._all_counts = self.table.unbind(0)
        self._rejected = self.table[1, num_domains + 4 :]  # (1,) weight vectors rejected so far
        self._ones: dict[int, torch.Tensor] = {}  # by batch size
        self._accumulate = accumulate_
        if compile:
            backend = "inductor" if compile is True else compile
            self._accumulate = torch.compile(accumulate_, fullgraph=True, dynamic=False, backend=backend)

    @property
    def problems(self) -> torch.Tensor:
        """[non-finite values skipped, out-of-range domain ids skipped, weight vectors rejected] since creation
        (or the last load)."""
        counts, k = self.table[1], self.num_domains
        return torch.stack([counts[k + 2], counts[0] + counts[k + 1], counts[k + 4]])

    @problems.setter
    def problems(self, problems: torch.Tensor) -> None:
        counts, k = self.table[1], self.num_domains
        counts[k + 1] = 0
        counts[0], counts[k + 2] = problems[1], problems[0]
        counts[k + 4] = problems[2] if len(problems) > 2 else 0

    def reject(self, rejected: torch.Tensor) -> None:
        """Count a weight vector the controller rejected (``rejected``: a 0-d bool tensor; no host sync)."""
        self._rejected.add_(rejected.to(self._rejected.dtype))

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
        if values.requires_grad:  # checked first: detach() makes a new tensor, a few µs on a CPU
            values = values.detach()
        if domains.dtype != torch.int64:
            domains = domains.long()
        ones = self._ones.get(len(domains))
        if ones is None:
            ones = self._ones[len(domains)] = torch.ones(len(domains), device=self.table.device)
        self._accumulate(self._all_sums, self._all_counts, values, domains, mask, ones)

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(means, present)`` since the last take, then reset. Absent domains have mean 0."""
        means, counts = self.take_counts()
        return means, counts.bool()

    def take_counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(means, counts)`` since the last take, then reset: the samples each mean is over (0: absent, mean 0)."""
        counts = self._counts.clone()
        means = self._sums / counts.clamp(min=1)
        self.window.zero_()
        return means, counts


def ema(previous: torch.Tensor, new: torch.Tensor, present: torch.Tensor, decay: float) -> torch.Tensor:
    """Exponential moving average that leaves domains absent from the batch unchanged."""
    return torch.where(present, torch.lerp(new, previous, decay), previous)
