import math

import numpy as np
import pytest
import yaml
from conftest import EXAMPLE_CONFIG, make_example, write_config, write_tokens

from onlinemix.loaders import ConfigError, MixedDataset, MixtureConfig


def test_the_example_config_loads_exactly_as_written(example):
    config = MixtureConfig.load(example)
    assert (config.seed, config.global_batch_size, config.seq_len) == (1234, 32, 128)
    assert config.names == ["code", "prose", "web"]
    assert [d.weight for d in config.domains] == [0.5, 0.3, 0.2]
    assert config.domains[1].max_epochs == 2 and config.domains[1].options == {"field": "text"}
    assert config.domains[0].path == str(example.parent / "data/code.bin")  # relative to the config's folder
    dataset = MixedDataset.from_config(example)
    assert np.allclose(dataset.schedule.weights_for(0, 1)[0], [0.5, 0.3, 0.2])
    assert dataset.spec.caps[1] == 2 * len(dataset.sources[1])  # max_epochs 2 of the prose windows


def test_temperature_rule_when_no_weight_is_given(tmp_path):
    make_example(tmp_path)
    raw = yaml.safe_load(EXAMPLE_CONFIG)
    for domain in raw["domains"]:
        domain.pop("weight")
    config_path = write_config(tmp_path, domains=raw["domains"], weighting={"temperature": 2.0})
    dataset = MixedDataset.from_config(config_path)
    sizes = dataset.spec.sizes.astype(float)
    expected = np.sqrt(sizes) / np.sqrt(sizes).sum()  # p ∝ size^(1/2)
    assert np.allclose(dataset.schedule.weights_for(0, 1)[0], expected)


def _domains(**changes):
    raw = yaml.safe_load(EXAMPLE_CONFIG)["domains"]
    for index, change in changes.items():
        raw[int(index[1:])].update(change)
    return raw


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"shuffle": True}, "config: unknown key 'shuffle'"),
        ({"weighting": {"temperature": 0}}, "weighting.temperature must be a number > 0"),
        ({"weighting": {"sampling": "stratified"}}, "weighting.sampling must be one of"),
        ({"global_batch_size": 0}, "global_batch_size must be >= 1"),
        ({"seq_len": "long"}, "seq_len must be an integer"),
        ({"domains": []}, "domains must be a non-empty list"),
        ({"domains": _domains(d0={"dtype": "uint16", "field": "x"})}, "domain 'code' (tokenbin): unknown key 'field'"),
        ({"domains": _domains(d1={"source": "csv"})}, "domain 'prose': source must be one of"),
        ({"domains": _domains(d2={"path": "data/missing.bin"})}, "domain 'web': file not found"),
        ({"domains": _domains(d1={"weight": -0.1})}, "domain 'prose': weight must be finite and >= 0"),
        ({"domains": _domains(d0={"weight": 0}, d1={"weight": 0}, d2={"weight": 0})}, "all weights are zero"),
        ({"domains": _domains(d0={"weight": 0.9})}, "weights sum to 1.4, not 1"),
        ({"domains": _domains(d1={"weight": None})}, "missing for ['prose']"),
        ({"domains": _domains(d2={"name": "code"})}, "domain name 'code' appears twice"),
        ({"domains": _domains(d1={"max_epochs": 0})}, "domain 'prose': max_epochs must be a number > 0"),
    ],
)
def test_bad_configs_name_the_key_file_or_domain(tmp_path, overrides, message):
    make_example(tmp_path)
    with pytest.raises(ConfigError) as error:
        MixedDataset.from_config(write_config(tmp_path, **overrides))
    assert message in str(error.value)


def test_zero_size_domain_is_an_error(tmp_path):
    make_example(tmp_path)
    write_tokens(tmp_path / "data/web.bin", np.arange(100))  # fewer than seq_len + 1 = 129 tokens
    with pytest.raises(ConfigError, match=r"domain 'web': .*web.bin holds no samples"):
        MixedDataset.from_config(tmp_path / "mixture.yaml")


def test_missing_config_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        MixtureConfig.load(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("domains: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        MixtureConfig.load(tmp_path / "bad.yaml")


def test_config_hash_changes_with_the_config(tmp_path):
    make_example(tmp_path)
    first = MixtureConfig.load(write_config(tmp_path)).config_hash()
    assert first == MixtureConfig.load(tmp_path / "mixture.yaml").config_hash()
    assert first != MixtureConfig.load(write_config(tmp_path, seed=1)).config_hash()
    assert len(first) == 64 and math.isfinite(int(first, 16))
