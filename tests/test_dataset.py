import functools
import json
import operator

import numpy as np
import pytest
import torch
from conftest import make_example, resealed

from onlinemix.loaders import ByteTokenizer, MixedDataset, MixedLoader

BATCHES = 24


def pairs(batches):
    return [list(zip(b["domain"].tolist(), b["index"].tolist())) for b in batches]


def run(config, num_workers=0, output="batches", num_batches=BATCHES, **loader_kwargs):
    dataset = MixedDataset.from_config(config, output=output, num_batches=num_batches)
    return list(MixedLoader(dataset, num_workers=num_workers, **loader_kwargs))


@pytest.fixture(scope="module")
def example_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture")
    make_example(root)
    return root / "mixture.yaml"


@pytest.fixture(scope="module")
def reference(example_dir):
    return run(example_dir)


def test_same_sequence_for_0_1_3_workers(example_dir, reference):
    expected = pairs(reference)
    assert len(expected) == BATCHES
    for workers in (1, 3):
        got = run(example_dir, num_workers=workers)
        assert pairs(got) == expected, workers
        assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(got, reference))


def test_fork_and_spawn_give_the_same_sequence(example_dir, reference):
    for context in ("fork", "spawn"):
        got = run(example_dir, num_workers=2, num_batches=6, multiprocessing_context=context)
        assert pairs(got) == pairs(reference[:6]), context


def test_per_sample_output_collates_to_the_same_batches(example_dir, reference):
    got = run(example_dir, num_workers=2, output="samples", num_batches=8)
    for a, b in zip(got, reference[:8]):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_batches_hold_the_samples_their_domain_and_index_name(example_dir, reference):
    dataset = MixedDataset.from_config(example_dir)
    batch = reference[3]
    assert batch["input_ids"].shape == (32, 128) and batch["labels"].dtype == torch.int64
    assert sorted(set(batch["domain"].tolist())) == [0, 1, 2]
    for row, (domain, index) in enumerate(zip(batch["domain"].tolist(), batch["index"].tolist())):
        window = dataset.sources[domain].record(index)  # prose: a window of its packed documents
        expected = {"input_ids": window[:-1], "labels": window[1:]}
        assert batch["input_ids"][row].tolist() == expected["input_ids"].tolist()
        assert batch["labels"][row].tolist() == expected["labels"].tolist()


def test_domain_shares_match_the_weights(reference):
    early = reference[:10]  # before prose reaches its max_epochs cap (2 epochs of its 59 windows)
    counts = np.bincount(torch.cat([b["domain"] for b in early]).numpy(), minlength=3)
    per_batch = counts / len(early)
    assert np.all(np.abs(per_batch - 32 * np.array([0.5, 0.3, 0.2])) <= 1)


@pytest.mark.parametrize("stop", [1, 5, 11])
def test_resume_continues_exactly_with_other_worker_counts(example_dir, reference, stop):
    dataset = MixedDataset.from_config(example_dir, num_batches=BATCHES)
    first = MixedLoader(dataset, num_workers=2)
    for seen, _ in enumerate(first, start=1):
        if seen == stop:
            break
    state = json.loads(json.dumps(first.state_dict()))  # plain data: survives any checkpoint format
    resumed = MixedLoader(MixedDataset.from_config(example_dir, num_batches=BATCHES), num_workers=3)
    resumed.load_state_dict(state)
    assert pairs(resumed) == pairs(reference[stop:])


@pytest.mark.parametrize("stop", [1, 7])
def test_a_prefetching_thread_gives_the_batches_and_checkpoints_of_no_workers(example_dir, reference, stop):
    import threading
    import time

    assert pairs(run(example_dir, thread_prefetch=3)) == pairs(reference)
    loader = MixedLoader(MixedDataset.from_config(example_dir, num_batches=BATCHES), thread_prefetch=3)
    for seen, _ in enumerate(loader, start=1):
        if seen == stop:
            break  # the thread has made batches beyond this one: they are not counted as handed out
    deadline = time.monotonic() + 10
    while any(t.name == "onlinemix-prefetch" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(t.name == "onlinemix-prefetch" for t in threading.enumerate())  # breaking out stopped it
    resumed = MixedLoader(MixedDataset.from_config(example_dir, num_batches=BATCHES), thread_prefetch=2)
    resumed.load_state_dict(json.loads(json.dumps(loader.state_dict())))
    assert pairs(resumed) == pairs(reference[stop:])
    assert pairs(loader) == pairs(reference[stop:])  # and the same loader continues where it stands


def test_thread_prefetch_is_checked_and_its_errors_reach_the_loop(example_dir, tmp_path):
    dataset = MixedDataset.from_config(example_dir, num_batches=BATCHES)
    with pytest.raises(ValueError, match="with num_workers=2 the worker processes make them"):
        MixedLoader(dataset, num_workers=2, thread_prefetch=2)
    with pytest.raises(ValueError, match="thread_prefetch must be an integer >= 0, got -1"):
        MixedLoader(dataset, thread_prefetch=-1)

    def broken(indices, out, rows):
        raise OSError("disk gone")

    dataset.sources[0].read_into = broken
    with pytest.raises(OSError, match="disk gone"):
        next(iter(MixedLoader(dataset, thread_prefetch=2)))


def test_persistent_workers_continue_where_the_loader_stands(example_dir, reference):
    dataset = MixedDataset.from_config(example_dir, num_batches=BATCHES)
    loader = MixedLoader(dataset, num_workers=2, persistent_workers=True, prefetch_factor=3, pin_memory=True)
    got = []
    for batch in loader:
        got.append(batch)
        if len(got) == 7:
            break
    got.extend(loader)  # second iter() on the same (persistent) workers
    assert pairs(got) == pairs(reference)


def test_resume_into_a_different_mixture_is_an_error(example_dir, tmp_path):
    loader = MixedLoader(MixedDataset.from_config(example_dir))
    state = loader.state_dict()
    state["mixture"]["global_batch_size"] = 64
    with pytest.raises(ValueError, match="global_batch_size was 64 when saved, is now 32"):
        loader.load_state_dict(resealed(state))
    with pytest.raises(ValueError, match="unsupported loader state version"):
        loader.load_state_dict(resealed({**state, "version": 99}))
    with pytest.raises(ValueError, match="the loader's checkpoint is damaged: its digest does not match"):
        loader.load_state_dict(state)  # changed after it was saved


def test_ranks_take_contiguous_slices_of_the_global_batch(example_dir, reference):
    slices = [run_rank(example_dir, rank) for rank in range(4)]
    for b in range(6):
        joined = functools.reduce(operator.iadd, (pairs([s[b]])[0] for s in slices), [])
        assert joined == pairs(reference)[b]


def run_rank(config, rank):
    dataset = MixedDataset.from_config(config, rank=rank, world_size=4, num_batches=6)
    return list(MixedLoader(dataset, num_workers=1))


def test_batch_size_must_divide_over_ranks(example_dir):
    with pytest.raises(ValueError, match="not divisible by world_size 3"):
        MixedDataset.from_config(example_dir, rank=0, world_size=3)


def test_repeat_cap_ends_a_domain_and_the_stream_goes_on(example_dir):
    batches = run(example_dir, num_batches=60)
    prose = sum(int((b["domain"] == 1).sum()) for b in batches)
    windows = len(MixedDataset.from_config(example_dir).sources[1])
    assert prose == 2 * windows  # max_epochs: 2 epochs of the prose windows, then no more
    assert len(batches) == 60 and int((batches[-1]["domain"] == 1).sum()) == 0


def _with_prose_transform(root, transform):
    make_example(root)
    config = root / "mixture.yaml"
    config.write_text(config.read_text().replace("field: text,", f"field: text, transform: '{transform}',"))
    return MixedDataset.from_config(config, num_batches=2)


def test_a_config_named_transform_runs_in_the_loader(tmp_path):
    batch = next(iter(MixedLoader(_with_prose_transform(tmp_path, "conftest:shout"))))
    row = int(np.flatnonzero(batch["domain"].numpy() == 1)[0])
    text = ByteTokenizer().decode(batch["input_ids"][row].tolist())
    assert text.startswith("DOCUMENT ") and text == text.upper()


def test_domains_with_different_fields_are_an_error(tmp_path):
    dataset = _with_prose_transform(tmp_path, "conftest:ids_only")
    with pytest.raises(ValueError, match="domains 'code' and 'prose' produce different fields"):
        list(MixedLoader(dataset))


def test_forked_workers_do_not_share_a_jsonl_file_offset(tmp_path):
    # Records (a transform reads each line): the parent reads a document first (as the field check does), then
    # forks workers that read lines in parallel.
    make_example(tmp_path, documents=3000)
    config = tmp_path / "mixture.yaml"
    text = config.read_text().replace("weight: 0.5", "weight: 0.0").replace("weight: 0.2", "weight: 0.0")
    text = text.replace("weight: 0.3, max_epochs: 2", "weight: 1.0, transform: 'conftest:shout'")
    config.write_text(text)
    expected = pairs(run(config, num_workers=0, num_batches=150))
    dataset = MixedDataset.from_config(config, num_batches=150)
    assert dataset.fields  # reads document 0 in this process, before the workers fork
    got = MixedLoader(dataset, num_workers=3, multiprocessing_context="fork")
    assert pairs(got) == expected
