"""Train a tiny GPT on a mixture of domains, nanoGPT style, with the mixture adapting online.

    python examples/prepare_data.py --out examples/data
    python examples/train_gpt.py --config examples/data/mixture.yaml --steps 200 --controller odm

The loader is a drop-in DataLoader: every batch carries ``domain``, so the
per-sample loss splits by domain for free, feeds the controller (``odm``:
EXP3 on the training loss; ``static``: the config's weights) and the new
weights reach the DataLoader workers through the weights channel. Every
weight version is logged to ``runs/schedule.oms`` (see ``onlinemix schedule
show``). ``--resume`` continues from the checkpoint's exact next batch and
weights.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from loaders import IGNORE_INDEX, ByteTokenizer, MixedDataset, MixedLoader
from mixing.controllers import ODMController, StaticController
from mixing.mixer import OnlineMixer


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


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of each sample over its real (non-padding) tokens."""
    tokens = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
    valid = (labels != IGNORE_INDEX).sum(1).clamp(min=1)
    return tokens.sum(1) / valid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("examples/data/mixture.yaml"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (speed only)")
    parser.add_argument(
        "--controller",
        choices=["odm", "static", "config"],
        default="odm",
        help="how the weights move ('config': the mixture file's mixing: section)",
    )
    parser.add_argument("--lag", type=int, default=4, help="batch b uses the weights of step b - lag")
    parser.add_argument("--checkpoint", type=Path, default=Path("runs/tiny_gpt.pt"))
    parser.add_argument("--log", type=Path, default=Path("runs/schedule.oms"), help="schedule log")
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    parser.add_argument("--log-every", type=int, default=25)
    args = parser.parse_args()
    torch.manual_seed(0)

    dataset = MixedDataset.from_config(args.config, num_batches=args.steps)
    initial = torch.from_numpy(dataset.schedule.weights_for(0, 1)[0].copy())
    if args.controller == "config":
        mixer = OnlineMixer.from_config(args.config, dataset, lag=args.lag, log=args.log)
    else:
        controller = ODMController(initial, warmup=10) if args.controller == "odm" else StaticController(initial)
        mixer = OnlineMixer(controller, dataset, lag=args.lag, log=args.log)
    controller = mixer.controller
    loader = MixedLoader(dataset, num_workers=args.workers)
    model = TinyGPT(ByteTokenizer.vocab_size, dataset.fields["input_ids"][0][0])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    if args.resume:
        checkpoint = torch.load(args.checkpoint)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        loader.load_state_dict(checkpoint["loader"])
        mixer.load_state_dict(checkpoint["mixer"])
    names, k = dataset.names, len(dataset.names)
    loss_sum, count = torch.zeros(k), torch.zeros(k)
    start = time.time()
    for batch in loader:
        step = loader.position.batch - 1
        losses = per_sample_loss(model(batch["input_ids"]), batch["labels"])
        optimizer.zero_grad(set_to_none=True)
        losses.mean().backward()
        optimizer.step()
        mixer.observe(losses, batch["domain"])
        mixer.step()
        loss_sum.index_add_(0, batch["domain"], losses.detach())
        count += torch.bincount(batch["domain"], minlength=k)
        if (step + 1) % args.log_every == 0:
            per_domain = "  ".join(f"{n} {s / max(c, 1):.3f}" for n, s, c in zip(names, loss_sum, count))
            weights = " ".join(f"{w:.2f}" for w in controller.weights.tolist())
            print(
                f"step {step + 1:5d}  loss {losses.mean():.3f} | {per_domain} | weights {weights} | "
                f"{time.time() - start:.0f}s"
            )
            loss_sum.zero_(), count.zero_()
    args.checkpoint.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "loader": loader.state_dict(),
        "mixer": mixer.state_dict(),
    }
    torch.save(state, args.checkpoint)
    mixer.close()
    print(f"saved {args.checkpoint} at batch {loader.position.batch}")


if __name__ == "__main__":
    main()
