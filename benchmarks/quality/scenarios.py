"""The quality suite's scenarios: what is trained on, what is measured, and every method and baseline.

- ``general``: six domains; the objective is the mean held-out loss over all six (DoReMi / ODM / ADO).
- ``targeted``: the same six domains; the objective is the held-out loss of a target none of them is
  (German manual pages), given only a small specific set of it to align with (DGA, importance).
- ``targeted+specific``: the same, with the specific set also a training domain (it can be memorised).
- ``small-specific``: the same with a specific set of 16 KB and 5 KB held out beside it to align with: drawn
  at the uniform mixture's rate it is seen about ten times over, and the domain whose training loss falls
  fastest is the one being memorised.
- ``tiny-specific``: the same with a specific set of a few KB: the uniform mixture draws it some 30 times
  over in a run, and a short proxy run, whose own repeat budget lets it take a third of the batch, would draw
  it four times as often over the full run: where the proxy workflow must keep the full run's budget.
- ``many``: 256 clusters of documents of every corpus; the objective is the same target: a method must
  find the few clusters of German manual pages (a bandit over clusters).

Every scenario has the static baselines (uniform, size-proportional, and a small grid the suite
searches itself, seed 0, whose best point is then run on every seed) and each online method once per
seed with fixed settings, chosen before any result was seen and the same in every scenario.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from data import GENERAL
from train import Method

from onlinemix import (
    ADOController,
    ClusterBanditController,
    Controller,
    DGAController,
    DoReMiController,
    MixedDataset,
    ODMController,
    ScheduledController,
    StaticController,
    neighbour_similarity,
)


@dataclass
class Scenario:
    name: str
    config: str  # the mixture file, in the data folder
    objective: list[str]  # held-out sets whose mean loss is the objective
    heldout: list[str]  # every held-out set evaluated
    methods: list[str]  # the online methods (and named baselines), one run per seed
    grid: dict[str, list[float]] = field(default_factory=dict)  # static grid points, by name
    align: str = "target/align.bin"  # the target sample DGA aligns with (never trained on)
    # each training domain's own held-out set (the memorisation guard's probes), by domain name
    domain_heldout: dict[str, str] = field(default_factory=dict)
    proxy: str | None = None  # the online method whose short run's schedule the proxy workflow replays
    # each domain's hashed n-gram counts (DSIR's, where the scenario fits it): the cluster bandit's neighbours
    features: np.ndarray | None = None

    @property
    def proxy_label(self) -> str | None:
        """The proxy workflow's name in the tables (``None`` where the scenario has none)."""
        return None if self.proxy is None else f"{PROXY}{self.proxy}"

    @property
    def proxy_labels(self) -> list[str]:
        """Both proxy workflows' names (the stretched schedule, the static export); none without a proxy."""
        return [] if self.proxy is None else [f"{PROXY}{self.proxy}", f"{EXPORT}{self.proxy}"]


def sizes(dataset: MixedDataset) -> torch.Tensor:
    return torch.tensor([float(len(source)) for source in dataset.sources])


def uniform(dataset: MixedDataset) -> torch.Tensor:
    return torch.full((len(dataset.sources),), 1 / len(dataset.sources))


def proportional(dataset: MixedDataset) -> torch.Tensor:
    return sizes(dataset) / sizes(dataset).sum()


def temperature(values: list[float] | np.ndarray, t: float) -> list[float]:
    weights = np.asarray(values, dtype=np.float64) ** (1 / t)
    return (weights / weights.sum()).tolist()


def emphasis(k: int, index: int, share: float) -> list[float]:
    """``share`` of the weight on domain ``index``, the rest spread evenly over the others."""
    weights = [(1 - share) / (k - 1)] * k
    weights[index] = share
    return weights


def target_prior(divergences: list[float], clusters: float) -> list[float]:
    """DSIR's domain prior ``w ∝ exp(-KL(target || domain) / T)``, with ``T`` set so that the weights spread
    over about ``clusters`` domains (the exponential of their entropy)."""
    kl = np.asarray(divergences, dtype=np.float64)
    low, high = 1e-4, 1e4  # bisect log T: the spread grows with T
    for _ in range(100):
        t = math.sqrt(low * high)
        weights = np.exp(-(kl - kl.min()) / t)
        weights /= weights.sum()
        spread = math.exp(-(weights * np.log(np.maximum(weights, 1e-300))).sum())
        low, high = (t, high) if spread < clusters else (low, t)
    return weights.tolist()


def scenarios(root: Path, results: Path | None = None) -> dict[str, Scenario]:
    """Every scenario; ``results`` (the suite's output folder) adds the target-aware static mixtures of the
    many-domains scenario once its importance estimator is fitted there."""
    names = list(GENERAL)
    k = len(names)
    own = {name: f"heldout/{name}.bin" for name in names}  # the general domains' held-out sets
    general_sizes = [_tokens(root / "train" / f"{name}.bin") for name in names]
    general = Scenario(
        "general",
        "general.yaml",
        objective=names,
        heldout=names,
        methods=["uniform", "proportional", "odm", "doremi", "ado", "coreset"],
        domain_heldout=own,
        proxy="odm",
        grid={
            "T=2": temperature(general_sizes, 2),
            "T=4": temperature(general_sizes, 4),
            **{f"2x {name}": emphasis(k, i, 2 / (k + 1)) for i, name in enumerate(names)},
        },
    )
    targeted = Scenario(
        "targeted",
        "targeted.yaml",
        objective=["target"],
        heldout=["target"],
        methods=["uniform", "proportional", "closest", *TARGET_BLIND, *TARGET_AWARE, "coreset"],
        align="target/specific.bin",
        domain_heldout=own,
        proxy="dga",
        grid={f"1/2 {name}": emphasis(k, i, 0.5) for i, name in enumerate(names)}
        | {"all po-de": emphasis(k, names.index("po-de"), 1.0)},
    )

    def with_specific(name: str, align: str, shares: tuple[float, ...], methods: list[str]) -> Scenario:
        """The targeted scenario with a specific set of the target among the training domains (``name.yaml``),
        ``align`` held out beside it (what DGA aligns with, and the specific domain's own held-out set)."""
        return Scenario(
            name,
            f"{name}.yaml",
            objective=["target"],
            heldout=["target"],
            methods=["uniform", "proportional", *methods],
            align=align,
            domain_heldout=own | {"specific": align},
            proxy="dga",
            grid={f"specific {share}": emphasis(k + 1, k, share) for share in shares},
        )

    blind_and_dga = [*TARGET_BLIND, "dga"]
    # static: the stream resamples each domain by DSIR's or the classifier's; or each batch is a coreset of a pool
    selection = ["importance", "classifier", "color-filter", "coreset"]
    bandits = ["bandit", "bandit" + UNGUARDED]  # unguarded: neither the epoch budget nor the probes hold it
    large = with_specific("targeted+specific", "target/align.bin", (0.05, 0.1, 0.2, 0.4, 0.7, 0.85),
                          ["closest", *blind_and_dga, *selection, "doremi-target", *bandits])  # fmt: skip
    small = with_specific("small-specific", "target/small-align.bin", (0.05, 0.25, 0.4, 0.7),
                          [*blind_and_dga, "ado" + UNGUARDED, "dga" + UNGUARDED])  # fmt: skip
    tiny = with_specific("tiny-specific", "target/small-align.bin", (0.02, 0.05, 0.1, 0.25), blind_and_dga)
    clusters = yaml.safe_load((root / "many.yaml").read_text())["domains"]
    cluster_sizes = [_tokens(root / domain["path"]) for domain in clusters]
    many = Scenario(
        "many",
        "many.yaml",
        objective=["target"],
        heldout=["target"],
        methods=[
            "uniform",
            "proportional",
            *TARGET_BLIND,
            *[m + WITH_PRIOR for m in TARGET_BLIND],
            "doremi-target",
            "doremi-target" + WITH_PRIOR,
            "bandit",
            "importance",
        ],
        grid={"T=2": temperature(cluster_sizes, 2), "T=4": temperature(cluster_sizes, 4)},
    )
    estimator = None if results is None else results / "importance" / "many" / "est.npz"
    if estimator is not None and estimator.exists():  # target-aware: DSIR's prior over the clusters
        from onlinemix.loaders.importance import ImportanceEstimator

        fitted = ImportanceEstimator.load(estimator)
        kl = [fitted.divergence(domain["name"]) for domain in clusters]
        many.grid.update({f"DSIR prior, ~{n} clusters": target_prior(kl, n) for n in (8, 32, 128)})
        many.features = np.stack([fitted.raw[domain["name"]] for domain in clusters])
    return {s.name: s for s in (general, targeted, large, small, tiny, many)}


# the knobs that turn off the repeat budget, the trust region and the minimum ratio (the probes are the trainer's to
# leave out)
UNGUARDED_KNOBS = {"repeat_budget": None, "trust_region": None, "min_ratio": None}


def _tokens(path: Path) -> int:
    return path.stat().st_size // 2


# ----------------------------------------------------------------------------- methods

UNGUARDED = "-unguarded"
WITH_PRIOR = "+prior"  # "ado+prior": ADO started from DSIR's prior over the clusters (~32) instead of uniform
PROXY = "proxy-"  # "proxy-dga": DGA's schedule from a run of PROXY_SHRINK times fewer steps, stretched to this run
EXPORT = "export-"  # "export-dga": the same run's mean weights as a static mixture (onlinemix schedule export)
ACROSS = "small-"  # "small-dga": the small model's whole DGA run's schedule, replayed on a larger model (sizes.py)
ACROSS_EXPORT = "small-export-"  # "small-export-dga": its mean weights as the larger model's static mixture
PROXY_SHRINK = 4
TARGET_BLIND = ["odm", "ado", "doremi"]  # the controllers that need no target: run in every scenario with one
# what needs a sample of the target
TARGET_AWARE = ["dga", "importance", "classifier", "color-filter", "doremi-target", "bandit"]
DGA_OPTIONS = {"eta": 10.0, "ema": 0.5, "min_prob": 0.01, "every": 10}  # η on cosine alignments (see method())
DOREMI_OPTIONS = {"eta": 0.1, "smoothing": 1e-3}
CORESET_POOL = 4  # mini-batch coresets: pools of 4 batches (CoLM's range is 2-4)
BANDIT_NEIGHBOURS = 8  # clusters that share credit (a cluster and its 7 nearest by DSIR n-grams)


def method(
    name: str,
    scenario: Scenario,
    grid_weights: list[float] | None = None,
    initial: list[float] | None = None,
    schedule: Path | None = None,
) -> Method:
    """The ``Method`` a name stands for in ``scenario`` (grid points: ``grid_weights``; ``initial``: the weights
    an online method starts from, its prior, for the names ending in ``+prior`` and the bandit; ``schedule``: a
    proxy run's schedule log, stretched to the run's steps; an export's static weights are ``grid_weights``)."""

    def build(cls: type, start=uniform, **options) -> Callable[..., Controller]:
        return lambda dataset, device, **knobs: cls(start(dataset), device=device, **{**options, **knobs})

    def online(cls: type, **options) -> Callable[[MixedDataset, str], Controller]:
        """An online controller from ``initial`` where given (a prior), else from the uniform mixture."""
        prior = None if initial is None else torch.tensor(initial)
        return build(cls, uniform if prior is None else lambda dataset: prior, **options)

    if name.endswith(UNGUARDED):  # the controller as it was: no probes, repeat budget, trust region, min ratio
        chosen = method(name.removesuffix(UNGUARDED), scenario, grid_weights, initial)
        chosen.name, chosen.guarded = name, False
        controller = chosen.controller
        chosen.controller = lambda dataset, device: controller(dataset, device, **UNGUARDED_KNOBS)
        return chosen
    if name.endswith(WITH_PRIOR):  # the same method started from DSIR's prior (``initial``) instead of uniform
        if initial is None:
            raise ValueError(f"{name} needs the prior it starts from")
        chosen = method(name.removesuffix(WITH_PRIOR), scenario, grid_weights, initial)
        chosen.name = name
        return chosen
    if schedule is not None:  # the proxy workflow: a short run's schedule log, stretched to this run's length
        return Method(name, lambda dataset, device: ScheduledController.from_log(
            schedule, steps=dataset.num_batches, device=device))  # fmt: skip
    if grid_weights is not None:  # a static mixture
        return Method(name, build(StaticController, lambda dataset: torch.tensor(grid_weights)))
    if name == "uniform":
        return Method(name, build(StaticController))
    if name == "proportional":
        return Method(name, build(StaticController, proportional))
    if name == "odm":
        return Method(name, online(ODMController, warmup=50), guarded=True)
    if name == "ado":  # its prior μ: its starting weights (uniform: the general objective weighs domains alike)
        return Method(name, online(ADOController, warmup=100), guarded=True)
    if name == "doremi":  # the reference model: the uniform mixture's, as in the DoReMi paper
        return Method(name, online(DoReMiController, **DOREMI_OPTIONS), reference="uniform", guarded=True)
    if name == "doremi-target":  # excess loss over a model of the specific set (RHO-loss's reducible loss)
        return Method(name, online(DoReMiController, **DOREMI_OPTIONS), reference="target", guarded=True)
    if name == "bandit":  # reward: the target model's likelihood; over many clusters, from DSIR's prior, with
        # neighbours sharing credit; over a few domains, from uniform, each its own arm
        similarity = None
        if scenario.features is not None:
            similarity = neighbour_similarity(np.log1p(scenario.features), BANDIT_NEIGHBOURS)
        return Method(name, online(ClusterBanditController, similarity=similarity), reward=("target",), guarded=True)
    if name == "coreset":  # the uniform mixture, each step's batch a CoLM-style coreset of a pool 4x as large
        return Method(name, build(StaticController), pool=CORESET_POOL)
    if name == "dga":  # aligned with a sample of the target that is never trained on
        return Method(name, online(DGAController, **DGA_OPTIONS), align=scenario.align, guarded=True)
    raise ValueError(f"unknown method {name!r}")
