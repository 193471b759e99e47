"""Train a tiny GPT on a mixture of domains, nanoGPT style, with the mixture adapting online.

    python examples/prepare_data.py --out examples/data
    python examples/train_gpt.py --config examples/data/mixture.yaml --steps 300 --method dga

The loader is a drop-in data loader: every batch carries ``domain``, so the per-sample loss splits by
domain for free, feeds the controller, and the new weights reach the DataLoader workers through the
weights channel. Methods (``--method``):

- ``uniform`` / ``proportional``: static weights (equal, or by domain size); ``config``: the mixture
  file's ``mixing:`` section (static weights without one);
- ``odm``: EXP3 on the training loss (more weight where the loss is high);
- ``ado``: per-domain power-law fits of the training loss (more weight where it still falls fastest);
- ``doremi``: excess loss over a ``--reference`` model (e.g. the uniform run's ``--save-model``);
- ``dga``: every ``--dga-every`` steps, align each domain's gradient with the gradient of ``--target``
  (a held-out set of ``heldout.yaml``, never trained on);
- ``bandit``: the cluster bandit, rewarding each sample by how well a ``--reference`` model of your target
  predicts it (minus its loss): more weight where the data looks like the target.

The online methods start from the mixture file's weights (its domains' ``weight:``, or its weighting rule):
they are the controller's prior.

``--coreset K`` trains on mini-batch coresets: the loader draws pools of ``K`` times the file's batch size, the
model scores each pool without gradients, and ``MiniBatchCoreset`` keeps the file's batch size of it (each
domain's share of the pool kept, the samples that cover the pool's gradients best picked); the loss is weighted
by how many pool samples each pick stands for (``--coreset-unweighted``: plain mean).

Every weight version is logged (``--log``; ``onlinemix schedule show``); ``--resume`` continues from
``--checkpoint`` with the exact next batch and weights (the DGA batches are keyed by the step, so a
resumed run draws the same ones). With ``heldout.yaml`` beside the config, the held-out loss of each
set (on ``--eval-windows`` windows spread over it) is printed every ``--eval-every`` steps; a progress bar
shows the training loss and the weights always. ``--tensorboard DIR`` writes TensorBoard event files there every
10 steps: the mixture's figures (``mixing/weight/<domain>``, ``mixing/loss/<domain>``, ... from
``mixing.metrics()``), the training loss and the held-out losses (``tensorboard --logdir DIR``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from tiny_gpt import TinyGPT
from tqdm import tqdm

from onlinemix import (
    ADOController,
    ByteTokenizer,
    ClusterBanditController,
    DGAController,
    DoReMiController,
    MiniBatchCoreset,
    MixedDataset,
    MixtureConfig,
    ODMController,
    OnlineMixer,
    OnlineMixing,
    Source,
    StaticController,
    gradient_alignment,
    output_gradients,
    per_sample_loss,
    save_checkpoint,
)
from onlinemix.loaders.build import build_sources

METHODS = ("uniform", "proportional", "config", "odm", "ado", "doremi", "dga", "bandit")
ETA = {"doremi": 0.1, "dga": 10.0}  # DGA's on cosine alignments (in [-1, 1]); DoReMi's on excess losses


def tensors(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {key: torch.from_numpy(np.ascontiguousarray(value)).long() for key, value in arrays.items()}


def batch_loss(model: TinyGPT, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return per_sample_loss(model(batch["input_ids"].to(model.device)), batch["labels"].to(model.device)).mean()


class HeldOut:
    """The sets of ``heldout.yaml``: fixed evaluation windows spread over each, and batches of the DGA target."""

    def __init__(self, path: Path, windows: int):
        config = MixtureConfig.load(path)
        self.sources = dict(zip(config.names, build_sources(config)))
        self.windows = {
            name: np.unique(np.linspace(0, len(source) - 1, min(windows, len(source))).astype(np.int64))
            for name, source in self.sources.items()
        }

    def batch(self, name: str, size: int, step: int) -> dict[str, torch.Tensor]:
        """``size`` random windows of ``name``, drawn from ``step`` alone (a resumed run draws the same)."""
        source = self.sources[name]
        return random_windows(source, min(size, len(source)), zlib.crc32(name.encode()), step)

    @torch.no_grad()
    def evaluate(self, model: TinyGPT) -> dict[str, float]:
        model.eval()
        losses = {}
        for name, indices in self.windows.items():
            total = sum(
                batch_loss(model, tensors(self.sources[name].read_batch(chunk))).item() * len(chunk)
                for chunk in np.array_split(indices, max(1, len(indices) // 256))
            )
            losses[name] = total / len(indices)
        model.train()
        return losses


def build_mixing(args: argparse.Namespace, config: MixtureConfig) -> OnlineMixing:
    """The dataset, the method's controller wired to it through the weights channel, and the loader."""
    on_device = {"device": args.device, **({"graph": True} if args.graph else {})}
    if args.method == "config":  # the file's mixing: section, its coreset included (--coreset overrides it)
        coreset = {"coreset": {"pool": args.coreset}} if args.coreset > 1 else {}
        options = {"num_batches": args.steps}
        return OnlineMixing.from_config(config, num_workers=args.workers, dataset_options=options, lag=args.lag,
                                        log=args.log, **on_device, **coreset)  # fmt: skip
    # With --coreset the loader's batches are pools of K batches, and the coreset keeps one batch of each.
    config = dataclasses.replace(config, global_batch_size=config.global_batch_size * args.coreset)
    dataset = MixedDataset.from_config(config, num_batches=args.steps)
    coreset = MiniBatchCoreset.for_pools(dataset, args.coreset) if args.coreset > 1 else None
    sizes = torch.tensor([float(len(source)) for source in dataset.sources])
    uniform = torch.full_like(sizes, 1 / len(sizes))
    start = torch.from_numpy(dataset.schedule.weights_for(0, 1)[0].copy()).float()  # the file's weights: the prior
    eta = args.eta or ETA.get(args.method, 1.0)
    controller = {
        "uniform": lambda: StaticController(uniform, **on_device),
        "proportional": lambda: StaticController(sizes / sizes.sum(), **on_device),
        "odm": lambda: ODMController(start, warmup=args.warmup or 10, **on_device),
        "ado": lambda: ADOController(start, warmup=args.warmup or 50, **on_device),
        "doremi": lambda: DoReMiController(start, eta=eta, **on_device),
        "dga": lambda: DGAController(start, eta=eta, ema=0.5, every=args.dga_every, min_prob=0.01, **on_device),
        "bandit": lambda: ClusterBanditController(start, warmup=args.warmup or 0, **on_device),
    }[args.method]()
    mixer = OnlineMixer(controller, dataset, lag=args.lag, log=args.log)
    return OnlineMixing(mixer, coreset=coreset, num_workers=args.workers)


def train(args: argparse.Namespace) -> dict:
    """One run; returns its history (held-out losses, weights, the (domain, index) pairs trained on)."""
    torch.manual_seed(args.seed)  # the model's initialisation; the sample order is the mixture file's seed
    config = MixtureConfig.load(args.config)
    mixing = build_mixing(args, config)
    # The mixture's tokenizer; a mixture of token-bin files alone names none: byte ids, as prepare_data.py writes.
    vocab = (mixing.dataset.tokenizer or ByteTokenizer()).vocab_size
    model = TinyGPT(vocab, config.seq_len, width=args.width, layers=args.layers).to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    heldout_path = args.config.parent / "heldout.yaml"
    heldout = HeldOut(heldout_path, args.eval_windows) if heldout_path.exists() else None
    reference = None
    if args.method in ("doremi", "bandit"):
        if args.reference is None:
            raise SystemExit(
                f"--method {args.method} needs --reference MODEL.pt (doremi: e.g. the uniform run's --save-model; "
                "bandit: a model of your target)"
            )
        reference = TinyGPT(vocab, config.seq_len, width=args.width, layers=args.layers).to(args.device)
        reference.load_state_dict(torch.load(args.reference, map_location=args.device))
        reference.eval()
    if args.method == "dga" and (heldout is None or args.target not in heldout.sources):
        raise SystemExit(f"--method dga needs {heldout_path} with a set named {args.target!r} (--target)")
    if args.resume:
        checkpoint = torch.load(args.checkpoint, weights_only=False, map_location=args.device)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        mixing.load_state_dict(checkpoint["mixing"])

    writer = None
    if args.tensorboard is not None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        writer = SummaryWriter(args.tensorboard)
    history = {"method": args.method, "evals": [], "trained": []}
    started = time.time()
    # Always a progress bar with the training loss and the weights (held-out losses too, with heldout.yaml).
    progress = tqdm(total=args.steps, initial=mixing.loader.position.batch, desc=args.method, unit="step")
    for batch in mixing:
        step = mixing.loader.position.batch  # this batch is step `step` (1-based) of the run
        if mixing.coreset is not None:  # the batch is a pool: keep the part that stands for all of it
            with torch.no_grad():
                pool_logits = model(batch["input_ids"].to(args.device))
                proxies = output_gradients(pool_logits, batch["labels"].to(args.device))
            batch = mixing.select(batch, proxies)
        ids, labels = batch["input_ids"].to(args.device), batch["labels"].to(args.device)
        losses = per_sample_loss(model(ids), labels)
        optimizer.zero_grad(set_to_none=True)
        if "coreset_weight" in batch and not args.coreset_unweighted:
            (losses * batch["coreset_weight"].to(args.device)).mean().backward()
        else:
            losses.mean().backward()
        optimizer.step()
        signals = {}
        if reference is not None:
            with torch.no_grad():
                reference_losses = per_sample_loss(reference(ids), labels)
            if args.method == "bandit":
                signals["reward"] = -reference_losses  # the target model's likelihood of each sample
            else:
                signals["reference"] = reference_losses
        mixing.observe(losses.detach(), batch, **signals)
        if args.method == "dga" and mixing.mixer.controller.alignment_due():  # the controller updates at this step
            per_domain = [domain_batch(mixing, d, args.dga_samples, step) for d in range(len(mixing.names))]
            target = heldout.batch(args.target, args.dga_samples, step)
            mixing.mixer.controller.observe_alignment(gradient_alignment(model, batch_loss, per_domain, target, True))
        mixing.step()
        history["trained"].append(torch.stack([batch["domain"], batch["index"]], 1).tolist())
        progress.update()
        if step % 10 == 0 or step == args.steps:  # a host sync for the bar: every 10 steps, not every step
            weights = " ".join(f"{name} {w:.2f}" for name, w in zip(mixing.names, mixing.weights.tolist()))
            progress.set_postfix_str(f"loss {losses.mean().item():.3f} | weights {weights}")
            if writer is not None:
                for name, value in {"train/loss": losses.mean().item(), **mixing.metrics()}.items():
                    writer.add_scalar(name, value, step)
        if heldout is not None and (step % args.eval_every == 0 or step == args.steps):
            losses_now = heldout.evaluate(model)
            history["evals"].append({"step": step, "loss": losses_now})
            report = "  ".join(f"{name} {loss:.3f}" for name, loss in losses_now.items())
            for name, loss in losses_now.items() if writer is not None else ():
                writer.add_scalar(f"heldout/{name}", loss, step)
            elapsed = time.time() - started
            progress.write(f"{args.method:>12} step {step:4d} | held out: {report} | {elapsed:.0f}s")
        if step == args.stop_after:
            break
    progress.close()
    if writer is not None:
        writer.close()
    history["seconds"] = time.time() - started
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "mixing": mixing.state_dict()}
    save_checkpoint(state, args.checkpoint)  # atomic: a kill mid-save leaves the previous checkpoint whole
    if args.save_model:
        save_checkpoint(model.state_dict(), args.save_model)
    mixing.close()
    print(f"saved {args.checkpoint} at batch {mixing.loader.position.batch}")
    return history


def domain_batch(mixing: OnlineMixing, domain: int, samples: int, step: int) -> dict[str, torch.Tensor]:
    """Random training samples of one domain for DGA's per-domain gradient, drawn from ``(domain, step)``."""
    return random_windows(mixing.dataset.sources[domain], samples, domain, step)


def random_windows(source: Source, count: int, *key: int) -> dict[str, torch.Tensor]:
    """``count`` windows of ``source`` drawn by a generator seeded with ``key`` alone (so a resumed run draws the
    same), read in index order."""
    indices = np.random.default_rng(key).choice(len(source), count)
    return tensors(source.read_batch(np.sort(indices)))


def parser() -> argparse.ArgumentParser:
    summary, usage, details = __doc__.split("\n\n", 2)
    parser = argparse.ArgumentParser(
        description=summary, epilog=usage + "\n\n" + details, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=Path("examples/data/mixture.yaml"), help="the mixture file")
    parser.add_argument("--method", choices=METHODS, default="odm", help="how the weights move (below)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps, one batch each (default 300)")
    parser.add_argument("--seed", type=int, default=0, help="the model's initialisation (default 0)")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW's learning rate (default 3e-3)")
    parser.add_argument("--width", type=int, default=128, help="model width (default 128)")
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks (default 2)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers: speed only, never the batches")
    parser.add_argument(
        "--lag",
        type=int,
        default=4,
        help="batch b is drawn with the weights of step b - lag. Default 4: the prefetch depth of 2 workers, the "
        "quickest reaction they allow in a run of a few hundred steps (the library's default, 16, covers 8 workers)",
    )
    parser.add_argument("--eta", type=float, help="step size of doremi (default 0.1) and dga (default 10)")
    parser.add_argument("--warmup", type=int, help="odm, ado, bandit: steps before the weights move (10, 50, 0)")
    parser.add_argument(
        "--reference", type=Path, help="doremi: the reference model's weights; bandit: a model of the target"
    )
    parser.add_argument("--target", default="target", help="dga: the heldout.yaml set to align with")
    parser.add_argument(
        "--dga-every", type=int, default=5, help="dga: steps between alignments while the weights move (default 5)"
    )
    parser.add_argument("--dga-samples", type=int, default=32, help="dga: samples per domain and target batch")
    parser.add_argument(
        "--coreset", type=int, default=1, help="train on a coreset of pools K times the batch (default 1: off)"
    )
    parser.add_argument(
        "--coreset-unweighted", action="store_true", help="with --coreset: a plain mean, not weighted by coverage"
    )
    parser.add_argument("--eval-every", type=int, default=50, help="steps between held-out reports (default 50)")
    parser.add_argument("--eval-windows", type=int, default=512, help="windows per held-out set (default 512)")
    parser.add_argument("--checkpoint", type=Path, default=Path("runs/tiny_gpt.pt"), help="written at the end")
    parser.add_argument("--save-model", type=Path, help="also save the model's weights here (a DoReMi reference)")
    parser.add_argument("--log", type=Path, default=Path("runs/schedule.oms"), help="the schedule log")
    parser.add_argument("--history", type=Path, help="write the run's history (JSON) here")
    parser.add_argument("--tensorboard", type=Path, metavar="DIR", help="write TensorBoard event files here")
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    parser.add_argument("--stop-after", type=int, help="stop (and save) after this step, as a preempted job would")
    parser.add_argument("--device", default="cpu", help="where the model and the controller run (cpu, cuda)")
    parser.add_argument("--graph", action="store_true", help="replay the controller as CUDA graphs (--device cuda)")
    return parser


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args = parser().parse_args()
    history = train(args)
    if args.history:
        args.history.parent.mkdir(parents=True, exist_ok=True)
        args.history.write_text(json.dumps(history))


if __name__ == "__main__":
    main()
