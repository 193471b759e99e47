"""Optional dependencies: imported where used, with an error that names the extra that installs them.

onlinemix itself needs torch, numpy, numba, pyyaml and tqdm. The rest is optional:

- ``pip install 'onlinemix[formats]'``: MDS shards (mosaicml-streaming), WebDataset shards, Parquet
  (pyarrow), saved Hugging Face datasets (datasets), ``.zst`` files (zstandard);
- ``pip install 'onlinemix[tokenizers]'``: Hugging Face ``tokenizer.json`` files;
- ``pip install 'onlinemix[plot]'``: the CLI's and the benchmarks' plots (matplotlib);
- ``pip install 'onlinemix[s3]'`` (or ``[gcs]``, ``[azure]``): domains and token caches in object storage
  (fsspec and its backend: s3fs, gcsfs, adlfs);
- ``pip install 'onlinemix[ray]'``: ``onlinemix prepare --engine ray``;
- ``pip install 'onlinemix[color-filter]'``: the CoLoR-Filter scorer's models (transformers);
- ``pip install 'onlinemix[litdata]'``: LitData optimized datasets (litdata's own reader);
- ``pip install 'onlinemix[fast]'``: tokenizing at ``fastokens``' speed, JSON parsed by ``orjson``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# module -> (the PyPI package that provides it, the extra that installs it)
PACKAGES = {
    "streaming": ("mosaicml-streaming", "formats"),
    "braceexpand": ("webdataset", "formats"),
    "webdataset": ("webdataset", "formats"),
    "pyarrow": ("pyarrow", "formats"),
    "datasets": ("datasets", "formats"),
    "zstandard": ("zstandard", "formats"),
    "tokenizers": ("tokenizers", "tokenizers"),
    "matplotlib": ("matplotlib", "plot"),
    "ray": ("ray", "ray"),
    "fsspec": ("fsspec", "s3"),  # the s3, gcs and azure extras install it with their backend
    "transformers": ("transformers", "color-filter"),
    "litdata": ("litdata", "litdata"),
    "fastokens": ("fastokens", "fast"),
}


def require(module: str, purpose: str) -> ModuleType:
    """``import module``; if it is missing, an ``ImportError`` saying which extra installs it and why it is needed."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        top = module.partition(".")[0]
        package, extra = PACKAGES.get(top, (top, "formats"))
        if error.name is not None and error.name.partition(".")[0] != top:
            raise  # something else is missing inside an installed package: its own error is the right one
        raise ImportError(
            f"{purpose} needs the {package} package, not installed: pip install 'onlinemix[{extra}]'"
        ) from None


def pyplot() -> ModuleType:
    """matplotlib's pyplot on the Agg backend (files only, no display needed)."""
    matplotlib = require("matplotlib", "drawing a plot")
    matplotlib.use("Agg")
    return require("matplotlib.pyplot", "drawing a plot")
