"""Train a tiny GPT on a mixture of domains, nanoGPT style, with the mixture adapting online.

    python examples/prepare_data.py --out examples/data
    python examples/train_gpt.py --config examples/data/mixture.yaml --steps 200 --method odm

The loader is a drop-in DataLoader: every batch carries ``domain``, so the
per-sample loss splits by domain for free, feeds the controller, and the new
weights reach the DataLoader workers through the weights channel. Methods:

- ``uniform`` / ``proportional``: static weights (equal, or by domain size);
  ``config``: the mixture file's ``mixing:`` section (static weights without one);
- ``odm``: EXP3 on the training loss (more weight where the loss is high);
- ``doremi``: excess loss over a ``--reference`` model (e.g. the uniform run's);
- ``dga``: every ``--dga-every`` steps, align each domain's gradient with the
  gradient of ``--target`` (a small held-out set named in ``heldout.yaml``).

Every weight version is logged (``--log``; see ``onlinemix schedule show``);
``--resume`` continues from ``--checkpoint`` with the exact next batch and
weights. With ``heldout.yaml`` beside the config, validation losses per
domain are printed every ``--eval-every`` steps.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from onlinemix.loaders import ByteTokenizer, MixedDataset, MixtureConfig
from onlinemix.loaders.build import build_sources
from onlinemix.mixing.controllers import (
    DGAController,
    DoReMiController,
    ODMController,
    StaticController,
    gradient_alignment,
)
from onlinemix.mixing.mixer import OnlineMixer
from onlinemix.mixing.training import OnlineMixing, per_sample_loss
from torch import nn

METHODS = ("uniform", "proportional", "config", "odm", "doremi", "dga")
ETA = {"doremi": 0.05, "dga": 4.0}  # step sizes that worked on the stdlib mixture at 400 steps


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attention(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int, seq_len: int, width: int = 128, layers: int = 2, heads: int = 4):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab, width), nn.Embedding(seq_len, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, vocab, bias=False)
        self.register_buffer("mask", torch.triu(torch.full((seq_len, seq_len), float("-inf")), diagonal=1))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        length = ids.shape[1]
        x = self.tokens(ids) + self.positions(torch.arange(length, device=ids.device))
        for block in self.blocks:
            x = block(x, self.mask[:length, :length])
        return self.head(self.norm(x))


def as_tensors(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {key: torch.from_numpy(np.ascontiguousarray(value)).long() for key, value in arrays.items()}


def batch_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    device = model.head.weight.device
    return per_sample_loss(model(batch["input_ids"].to(device)), batch["labels"].to(device)).mean()


class HeldOut:
    """The held-out sets of ``heldout.yaml``: fixed validation batches, and samples of the target set."""

    def __init__(self, path: Path, samples: int):
        config = MixtureConfig.load(path)
        self.sources = dict(zip(config.names, build_sources(config)))
        self.samples = samples
        self.rng = np.random.default_rng(0)

    def read(self, name: str, indices: np.ndarray) -> dict[str, torch.Tensor]:
        return as_tensors(self.sources[name].read_batch(indices))

    def random_batch(self, name: str) -> dict[str, torch.Tensor]:
        size = len(self.sources[name])
        return self.read(name, self.rng.choice(size, min(self.samples, size), replace=False))

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Mean loss on the first ``samples`` windows of every held-out set (the same ones every time)."""
        model.eval()
        losses = {}
        for name, source in self.sources.items():
            batch = self.read(name, np.arange(min(self.samples * 2, len(source))))
            losses[name] = batch_loss(model, batch).item()
        model.train()
        return losses


def build_mixer(args: argparse.Namespace, mixing_config: MixtureConfig) -> OnlineMixing:
    """The dataset, the method's controller wired to it through the weights channel, and the loader."""
    dataset = MixedDataset.from_config(mixing_config, num_batches=args.steps)
    on_device = {"device": args.device, **({"graph": True} if args.graph else {})}
    if args.method == "config":
        mixer = OnlineMixer.from_config(mixing_config, dataset, lag=args.lag, log=args.log, **on_device)
        return OnlineMixing(mixer, num_workers=args.workers)
    sizes = torch.tensor([float(len(source)) for source in dataset.sources])
    eta = args.eta or ETA.get(args.method, 1.0)
    uniform = torch.full_like(sizes, 1 / len(sizes))
    controller = {
        "uniform": lambda: StaticController(uniform, **on_device),
        "proportional": lambda: StaticController(sizes / sizes.sum(), **on_device),
        "odm": lambda: ODMController(uniform, warmup=10, **on_device),
        "doremi": lambda: DoReMiController(uniform, eta=eta, smoothing=1e-3, **on_device),
        "dga": lambda: DGAController(uniform, eta=eta, ema=0.5, every=args.dga_every, min_prob=0.02, **on_device),
    }[args.method]()
    mixer = OnlineMixer(controller, dataset, lag=args.lag, log=args.log)
    return OnlineMixing(mixer, num_workers=args.workers)


def train(args: argparse.Namespace) -> dict:
    """One run; returns its history (validation losses, weights, the (domain, index) pairs trained on)."""
    torch.manual_seed(0)
    config = MixtureConfig.load(args.config)
    mixing = build_mixer(args, config)
    model = TinyGPT(ByteTokenizer.vocab_size, config.seq_len).to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    heldout_path = args.config.parent / "heldout.yaml"
    heldout = HeldOut(heldout_path, args.eval_samples) if heldout_path.exists() else None
    reference = None
    if args.method == "doremi":
        if args.reference is None:
            raise SystemExit("--method doremi needs --reference MODEL.pt (e.g. the uniform run's --save-model)")
        reference = TinyGPT(ByteTokenizer.vocab_size, config.seq_len).to(args.device)
        reference.load_state_dict(torch.load(args.reference, map_location=args.device))
        reference.eval()
    if args.method == "dga" and (heldout is None or args.target not in heldout.sources):
        raise SystemExit(f"--method dga needs {heldout_path} with a domain named {args.target!r} (--target)")
    if args.resume:
        checkpoint = torch.load(args.checkpoint, weights_only=False, map_location=args.device)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        mixing.load_state_dict(checkpoint["mixing"])

    names, history = mixing.names, {"method": args.method, "evals": [], "trained": []}
    start = time.time()
    for batch in mixing:
        step = mixing.loader.position.batch - 1
        ids, labels = batch["input_ids"].to(args.device), batch["labels"].to(args.device)
        losses = per_sample_loss(model(ids), labels)
        optimizer.zero_grad(set_to_none=True)
        losses.mean().backward()
        optimizer.step()
        signals = {}
        if reference is not None:
            with torch.no_grad():
                signals["reference"] = per_sample_loss(reference(ids), labels)
        mixing.observe(losses.detach(), batch, **signals)
        if args.method == "dga" and (step + 1) % args.dga_every == 0:  # the controller updates at this step
            per_domain = [domain_sample(mixing, d, args.eval_samples) for d in range(len(names))]
            alignment = gradient_alignment(model, batch_loss, per_domain, heldout.random_batch(args.target))
            mixing.mixer.controller.observe_alignment(alignment)
        mixing.step()
        history["trained"].append(torch.stack([batch["domain"], batch["index"]], 1).tolist())
        if heldout is not None and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
            validation = heldout.evaluate(model)
            history["evals"].append({"step": step + 1, "loss": validation})
            report = "  ".join(f"{name} {loss:.3f}" for name, loss in validation.items())
            weights = " ".join(f"{w:.2f}" for w in mixing.weights.tolist())
            elapsed = time.time() - start
            print(f"{args.method:>12} step {step + 1:4d} | val {report} | weights {weights} | {elapsed:.0f}s")
    history["seconds"] = time.time() - start
    args.checkpoint.parent.mkdir(parents=True, exist_ok=True)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "mixing": mixing.state_dict()}
    torch.save(state, args.checkpoint)
    if args.save_model:
        torch.save(model.state_dict(), args.save_model)
    mixing.close()
    print(f"saved {args.checkpoint} at batch {mixing.loader.position.batch}")
    return history


def domain_sample(mixing: OnlineMixing, domain: int, samples: int) -> dict[str, torch.Tensor]:
    """A few random training samples of one domain, for DGA's per-domain gradient."""
    source = mixing.dataset.sources[domain]
    indices = np.random.default_rng((domain, mixing.mixer.step_count)).choice(len(source), samples)
    return as_tensors(source.read_batch(np.sort(indices)))


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("examples/data/mixture.yaml"))
    parser.add_argument("--method", choices=METHODS, default="odm", help="how the weights move (see above)")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps (= batches)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (speed only, never the batches)")
    parser.add_argument(
        "--lag",
        type=int,
        default=4,
        help="batch b uses the weights of step b - lag (default 4: the prefetch depth of 2 workers, the "
        "quickest reaction they allow, for runs of a few hundred steps; the library's default is 16)",
    )
    parser.add_argument("--eta", type=float, help=f"step size of doremi / dga (default {ETA})")
    parser.add_argument("--reference", type=Path, help="doremi: the reference model's weights")
    parser.add_argument("--target", default="target", help="dga: the heldout.yaml set to align with")
    parser.add_argument("--dga-every", type=int, default=5, help="dga: steps between alignment measurements")
    parser.add_argument("--eval-every", type=int, default=25, help="steps between validation reports")
    parser.add_argument("--eval-samples", type=int, default=32, help="samples per alignment batch (x2 per eval)")
    parser.add_argument("--checkpoint", type=Path, default=Path("runs/tiny_gpt.pt"))
    parser.add_argument("--save-model", type=Path, help="also save the model's weights here (a DoReMi reference)")
    parser.add_argument("--log", type=Path, default=Path("runs/schedule.oms"), help="schedule log")
    parser.add_argument("--history", type=Path, help="write the run's history (JSON) here")
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    parser.add_argument("--device", default="cpu", help="where the model and the controller run (cpu, cuda)")
    parser.add_argument(
        "--graph", action="store_true", help="replay the controller as CUDA graphs (with --device cuda)"
    )
    return parser


def main() -> None:
    args = parser().parse_args()
    history = train(args)
    if args.history:
        args.history.parent.mkdir(parents=True, exist_ok=True)
        args.history.write_text(json.dumps(history))


if __name__ == "__main__":
    main()
