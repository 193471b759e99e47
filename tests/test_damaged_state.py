"""No damaged state is trusted: a checkpoint with any one byte changed either resumes exactly the saved run or is
one line naming what is damaged; a schedule log whose header or records were changed says so."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from conftest import write_tokens

from onlinemix import CheckpointError, OnlineMixing, load_checkpoint, save_checkpoint

STEPS, SAVED_AT = 8, 4


def tiny_mixture(root):
    domains = ""
    for name, step, weight in (("a", 1, 0.5), ("b", 3, 0.3), ("c", 5, 0.2)):
        write_tokens(root / f"{name}.bin", np.arange(3000) * step % 256)
        domains += f"  - {{name: {name}, source: tokenbin, path: {name}.bin, weight: {weight}}}\n"
    config = root / "mixture.yaml"
    config.write_text("seed: 3\nglobal_batch_size: 8\nseq_len: 16\nvocab_size: 256\ndomains:\n" + domains)
    return config


def mixing_of(config) -> OnlineMixing:
    return OnlineMixing.from_config(config, controller="odm", lag=1, dataset_options={"num_batches": STEPS})


def train(mixing: OnlineMixing, steps: int) -> list:
    """``steps`` steps with losses fixed by the batch; what each drew and the weights after it."""
    seen = []
    for _, batch in zip(range(steps), mixing):  # range first: no batch is drawn past the last step
        mixing.observe(1.0 + batch["domain"].float() + 0.1 * (batch["index"] % 7).float(), batch)
        seen.append((batch["domain"].tolist(), batch["index"].tolist(), mixing.step().tolist()))
    return seen


def test_every_one_byte_change_of_a_checkpoint_resumes_exactly_or_is_one_line(tmp_path):
    config = tiny_mixture(tmp_path)
    mixing = mixing_of(config)
    first = train(mixing, SAVED_AT)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(mixing.state_dict(), path)
    rest = train(mixing, STEPS - SAVED_AT)
    assert len(first) == SAVED_AT and len(rest) == STEPS - SAVED_AT
    saved = path.read_bytes()
    resumed = mixing_of(config)
    outcomes = {"exact": 0, "unreadable": 0, "refused by its digest": 0}
    damaged = tmp_path / "damaged.pt"
    for position in range(len(saved)):
        changed = bytearray(saved)
        changed[position] ^= 0x5A
        damaged.write_bytes(bytes(changed))
        try:
            state = load_checkpoint(damaged)
        except CheckpointError as error:
            assert "\n" not in str(error) and "cannot be read as a checkpoint" in str(error)
            outcomes["unreadable"] += 1
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # a state without its digest would be loaded with a warning
                resumed.load_state_dict(state)
        except CheckpointError as error:
            assert "\n" not in str(error) and "is damaged" in str(error)
            outcomes["refused by its digest"] += 1
            continue
        except Exception as error:
            pytest.fail(f"byte {position}: a raw {type(error).__name__}: {error}")
        assert train(resumed, STEPS - SAVED_AT) == rest, f"byte {position}: resumed into a different run"
        outcomes["exact"] += 1
    # a byte of the zip's padding, of a record's name or of a CRC no reader checks changes nothing: those resume
    # exactly; every change of what the state holds is refused
    assert sum(outcomes.values()) == len(saved) and outcomes["refused by its digest"] > 100, outcomes


def test_a_state_without_its_digest_is_named_when_it_lacks_what_it_needs(tmp_path):
    config = tiny_mixture(tmp_path)
    mixing = mixing_of(config)
    train(mixing, 2)
    state = mixing.state_dict()
    loader = {key: value for key, value in state["loader"].items() if key != "digest"}
    with pytest.warns(UserWarning, match="the loader's checkpoint was saved without a digest"):
        mixing.loader.load_state_dict(loader)  # an earlier version's: loaded as it is
    del loader["position"]
    with pytest.raises(CheckpointError, match="the loader's checkpoint is damaged or not one: it has no digest and "
                       "lacks 'position'"):  # fmt: skip
        mixing.loader.load_state_dict(loader)
    with pytest.raises(CheckpointError, match=r"the mixing checkpoint is damaged or not one: it holds \['loaded', "):
        mixing.load_state_dict({"loaded": state["loader"], "mixer": state["mixer"]})
    buffer = io.BytesIO()
    torch.save({"mixing": state}, buffer)
    (tmp_path / "short.pt").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(CheckpointError, match=r"short\.pt cannot be read as a checkpoint .* damaged or not one"):
        load_checkpoint(tmp_path / "short.pt")
    with pytest.raises(CheckpointError, match=r"checkpoint not found: .*absent\.pt"):
        load_checkpoint(tmp_path / "absent.pt")
