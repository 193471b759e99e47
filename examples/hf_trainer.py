"""Online mixing inside the Hugging Face Trainer: a small GPT-2 (from a config, no download) on a mixture file.

    python examples/prepare_data.py --out examples/data
    python examples/hf_trainer.py --config examples/data/mixture.yaml --steps 200
    python examples/hf_trainer.py --config examples/data/mixture.yaml --steps 300 --resume

``MixingTrainer`` is the stock ``Trainer`` with onlinemix's loader, the model's own loss (per-sample
losses fed to the mixer alongside), one weight update per optimizer step and the mixture's state in
every ``checkpoint-N`` folder; ``--resume`` continues from the last one, bit for bit. Seeded (``--seed``):
two runs with the same arguments are identical.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments, set_seed

from onlinemix import ByteTokenizer, MixtureConfig, OnlineMixing
from onlinemix.mixing.integrations.hf import MixingTrainer


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("examples/data/mixture.yaml"), help="the mixture file")
    parser.add_argument("--controller", default="odm", help="odm, ado, static, ... (default odm)")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    parser.add_argument("--accumulation", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--out", type=Path, default=Path("runs/hf"), help="checkpoints and the schedule log")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    parser.add_argument("--seed", type=int, default=0, help="the model's initialisation (the data's is the file's)")
    return parser


def main(argv: list[str] | None = None) -> MixingTrainer:
    args = parser().parse_args(argv)
    set_seed(args.seed)  # before the model is built: two runs with the same arguments are the same run
    config = MixtureConfig.load(args.config)
    mixing = OnlineMixing.from_config(
        config, controller=args.controller, accumulation=args.accumulation, log=args.out / "schedule.oms"
    )
    # The mixture's tokenizer; a mixture of token-bin files alone names none: byte ids, as prepare_data.py writes.
    vocab = (mixing.dataset.tokenizer or ByteTokenizer()).vocab_size
    model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=config.seq_len, n_embd=64, n_layer=2, n_head=4))
    training = TrainingArguments(
        output_dir=str(args.out),
        max_steps=args.steps,  # a stream has no epochs: the run length is in steps
        gradient_accumulation_steps=args.accumulation,  # must equal the mixer's accumulation (checked)
        learning_rate=3e-3,
        save_steps=max(1, args.steps // 4),
        logging_steps=max(1, args.steps // 10),
        report_to=[],
        disable_tqdm=True,
        seed=args.seed,
    )
    trainer = MixingTrainer(model=model, args=training, mixing=mixing)
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    mixing.close()
    weights = " ".join(f"{name} {w:.2f}" for name, w in zip(mixing.names, mixing.weights.tolist()))
    print(f"final weights: {weights}; schedule log: {args.out / 'schedule.oms'}")
    return trainer


if __name__ == "__main__":
    main()
