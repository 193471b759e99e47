"""Trainer integrations: Hugging Face ``Trainer`` (``hf``) and PyTorch Lightning (``lightning``).

Each module imports its framework only when imported itself, so onlinemix
does not depend on either. A plain PyTorch loop needs none of them: use
``onlinemix.OnlineMixing``.
"""
