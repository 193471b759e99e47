"""Online mixing inside a PyTorch Lightning Trainer: the tiny GPT as a LightningModule, one callback.

    python examples/prepare_data.py --out examples/data
    python examples/lightning_trainer.py --config examples/data/mixture.yaml --steps 200
    python examples/lightning_trainer.py --config examples/data/mixture.yaml --steps 300 --resume

``training_step`` returns the per-sample losses beside the loss it optimises; ``OnlineMixingCallback``
feeds them to the mixer, steps it once per optimizer step and keeps the mixture's state in Lightning's
checkpoints. Lightning fetches a batch ahead of the one it trains, so the mixer needs ``lag >= 2``.
Seeded (``--seed``): two runs with the same arguments are identical, and a resumed run continues the
uninterrupted one.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning.pytorch as pl
import torch
from tiny_gpt import TinyGPT

from onlinemix import ByteTokenizer, MixtureConfig, OnlineMixing, per_sample_loss
from onlinemix.mixing.integrations.lightning import OnlineMixingCallback


class LitGPT(pl.LightningModule):
    def __init__(self, vocab: int, seq_len: int, lr: float = 3e-3):
        super().__init__()
        self.model, self.lr = TinyGPT(vocab, seq_len), lr

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        losses = per_sample_loss(self.model(batch["input_ids"]), batch["labels"])
        return {"loss": losses.mean(), "losses": losses.detach()}  # "losses": what the callback feeds the mixer

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("examples/data/mixture.yaml"), help="the mixture file")
    parser.add_argument("--controller", default="odm", help="odm, ado, static, ... (default odm)")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    parser.add_argument("--accumulation", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--out", type=Path, default=Path("runs/lightning"), help="checkpoints and the schedule log")
    parser.add_argument("--resume", action="store_true", help="continue from --out/last.ckpt")
    parser.add_argument("--seed", type=int, default=0, help="the model's initialisation (the data's is the file's)")
    return parser


def main(argv: list[str] | None = None) -> pl.Trainer:
    args = parser().parse_args(argv)
    pl.seed_everything(args.seed, verbose=False)  # two runs with the same arguments are the same run
    config = MixtureConfig.load(args.config)
    mixing = OnlineMixing.from_config(
        config, controller=args.controller, lag=4, accumulation=args.accumulation, log=args.out / "schedule.oms"
    )
    callback = OnlineMixingCallback(mixing)
    checkpoints = pl.callbacks.ModelCheckpoint(
        dirpath=args.out, every_n_train_steps=max(1, args.steps // 4), save_last=True, save_top_k=-1
    )
    trainer = pl.Trainer(
        max_steps=args.steps,
        accumulate_grad_batches=args.accumulation,  # must equal the mixer's accumulation (checked)
        callbacks=[callback, checkpoints],
        accelerator="auto",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    # The mixture's tokenizer; a mixture of token-bin files alone names none: byte ids, as prepare_data.py writes.
    vocab = (mixing.dataset.tokenizer or ByteTokenizer()).vocab_size
    module = LitGPT(vocab, config.seq_len)
    resume = str(args.out / "last.ckpt") if args.resume else None
    trainer.fit(module, train_dataloaders=callback.train_dataloader(), ckpt_path=resume)
    mixing.close()
    weights = " ".join(f"{name} {w:.2f}" for name, w in zip(mixing.names, mixing.weights.tolist()))
    print(f"final weights: {weights}; schedule log: {args.out / 'schedule.oms'}")
    return trainer


if __name__ == "__main__":
    main()
