"""The conventions PyTorch users expect: len, batch_size, a stream that says when it is over, DataLoader
misuse named, torchdata's StatefulDataLoader resuming exactly, optional extras named, a forgotten step()."""

from __future__ import annotations

import logging
import sys

import pytest
import torch
import yaml
from conftest import make_example
from torch.utils.data import DataLoader

from onlinemix import MixedDataset, MixedLoader, ODMController, OnlineMixer, OnlineMixing
from onlinemix.loaders.loader import StreamOver


def pairs(batch) -> list[tuple[int, int]]:
    return list(zip(batch["domain"].tolist(), batch["index"].tolist()))


def test_len_batch_size_and_what_a_mixed_loader_is(example):
    loader = MixedLoader(MixedDataset.from_config(example, num_batches=7))
    assert not isinstance(loader, DataLoader) and loader.dataloader is None  # it makes one per iter()
    assert loader.batch_size == 32 and len(loader) == 7
    first = next(iter(loader))
    assert len(loader) == 6 and loader.dataloader is None  # in process: it iterates the dataset itself
    workers = MixedLoader(MixedDataset.from_config(example, num_batches=7), num_workers=1)
    assert torch.equal(next(iter(workers))["input_ids"], first["input_ids"])
    assert isinstance(workers.dataloader, DataLoader)
    assert first["input_ids"].shape == (32, 128)
    assert MixedLoader(MixedDataset.from_config(example, world_size=2, rank=1)).batch_size == 16
    with pytest.raises(TypeError, match="without num_batches streams on: it has no length"):
        len(MixedLoader(MixedDataset.from_config(example)))


def test_the_length_of_a_capped_mixture_is_where_its_caps_end_the_stream(tmp_path):
    path = make_example(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["domains"] = [raw["domains"][1]]  # prose alone, max_epochs 2
    raw["domains"][0]["weight"] = 1.0
    path.write_text(yaml.safe_dump(raw))
    loader = MixedLoader(MixedDataset.from_config(path, num_batches=1000))
    expected = len(list(loader))
    assert expected < 1000 and expected == 2 * len(loader.dataset.sources[0]) // 32
    fresh = MixedLoader(MixedDataset.from_config(path, num_batches=1000))
    assert len(fresh) == expected


def test_iterating_again_continues_the_stream_and_an_exhausted_one_says_so(example):
    reference = [pairs(b) for b in MixedLoader(MixedDataset.from_config(example, num_batches=6))]
    loader = MixedLoader(MixedDataset.from_config(example, num_batches=6))
    epochs = []
    for _ in range(2):  # the usual epoch loop: each pass continues where the last one stopped
        seen = []
        for batch in loader:
            seen.append(pairs(batch))
            if len(seen) == 3:
                break
        epochs.append(seen)
    assert epochs[0] + epochs[1] == reference
    with pytest.raises(StreamOver, match="handed out all 6 batches of its stream"):
        next(iter(loader))


def test_a_stream_ended_by_its_caps_says_so_on_the_next_pass(tmp_path):
    path = make_example(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["domains"] = [raw["domains"][1] | {"weight": 1.0}]
    path.write_text(yaml.safe_dump(raw))
    loader = MixedLoader(MixedDataset.from_config(path))
    list(loader)
    with pytest.raises(StreamOver, match=r"the stream ended at batch \d+: every domain with a positive weight"):
        list(loader)


def test_a_dataloader_that_would_batch_whole_batches_again_is_an_error(example):
    dataset = MixedDataset.from_config(example, num_batches=20)
    with pytest.raises(TypeError, match="batching 8 items of a MixedDataset that yields whole batches already"):
        next(iter(DataLoader(dataset, batch_size=8)))
    assert next(iter(DataLoader(dataset, batch_size=None)))["input_ids"].shape == (32, 128)
    samples = MixedDataset.from_config(example, output="samples", num_batches=4)
    assert next(iter(DataLoader(samples, batch_size=32)))["input_ids"].shape == (32, 128)


@pytest.mark.parametrize(("output", "workers"), [("batches", 0), ("batches", 2), ("samples", 2)])
def test_statefuldataloader_resumes_exactly_without_fast_forwarding(example, caplog, output, workers):
    from torchdata.stateful_dataloader import StatefulDataLoader

    def loader():
        dataset = MixedDataset.from_config(example, output=output, num_batches=12)
        batch_size = None if output == "batches" else 16  # samples: half a batch per step, so states fall mid-batch
        return StatefulDataLoader(dataset, batch_size=batch_size, num_workers=workers)

    reference = [pairs(b) for b in loader()]
    first = loader()
    head = []
    for batch in first:
        head.append(pairs(batch))
        if len(head) == 5:
            state = first.state_dict()
            break
    resumed = loader()
    resumed.load_state_dict(state)
    with caplog.at_level(logging.WARNING):
        tail = [pairs(b) for b in resumed]
    assert head + tail == reference
    assert "fast-forwarding" not in caplog.text


def test_forgetting_step_is_an_error_at_once_naming_the_fix(example):
    dataset = MixedDataset.from_config(example, num_batches=10)
    initial = torch.from_numpy(dataset.schedule.weights_for(0, 1)[0].copy())
    mixer = OnlineMixer(ODMController(initial), dataset, lag=2, timeout=600)
    seen = 0
    with pytest.raises(RuntimeError, match=r"drawn with the weights of step 1, but the mixer has stepped 0 time\(s\)"):
        for batch in MixedLoader(dataset):
            mixer.observe(torch.ones(32), batch["domain"])  # ... and no mixer.step()
            seen += 1
    assert seen == 3  # batches 0-2 use the initial weights; batch 3 needs step 1, which never comes


def test_a_missing_optional_package_names_the_extra_that_installs_it(tmp_path, monkeypatch):
    from onlinemix.loaders.sources import MdsSource

    (tmp_path / "index.json").write_text('{"version": 2, "shards": []}')
    monkeypatch.setitem(sys.modules, "streaming", None)
    monkeypatch.setitem(sys.modules, "streaming.base.format", None)
    with pytest.raises(ImportError, match=r"an mds domain needs the mosaicml-streaming package.*onlinemix\[formats\]"):
        MdsSource(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    from onlinemix.loaders.extras import pyplot

    with pytest.raises(ImportError, match=r"drawing a plot needs the matplotlib package.*onlinemix\[plot\]"):
        pyplot()


def test_online_mixing_is_a_loop_of_four_lines(example):
    mixing = OnlineMixing.from_config(example, controller="odm", lag=1, dataset_options={"num_batches": 5})
    assert mixing.batch_size == 32
    with pytest.raises(TypeError, match=r"capped mixture .* with online weights is unknown"):
        len(mixing)  # the example caps prose (max_epochs: 2): where it ends depends on the weights to come
    for batch in mixing:
        mixing.observe(torch.rand(32), batch)
        mixing.step()
    assert mixing.mixer.step_count == 5
