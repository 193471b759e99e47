"""Trainer integrations: Hugging Face ``Trainer`` and accelerate (``hf``), PyTorch Lightning (``lightning``),
torchtitan (``torchtitan``).

Each module imports its framework only when imported itself, so onlinemix
does not depend on any of them. A plain PyTorch loop needs none of them: use
``onlinemix.OnlineMixing``.
"""
