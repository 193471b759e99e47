import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onlinemix.loaders.permutation import block_bits, permute


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 3000), key=st.integers(0, 2**64 - 1))
def test_permute_is_a_bijection_of_range_n(n, key):
    image = permute(np.arange(n), n, key)
    assert image.dtype == np.int64
    assert np.array_equal(np.sort(image), np.arange(n))


def test_permute_is_injective_on_a_huge_domain_without_index_arrays():
    n = 10**10 + 7
    indices = np.random.default_rng(0).choice(n, size=20_000, replace=False)
    image = permute(indices, n, key=42)
    assert image.min() >= 0 and image.max() < n
    assert len(np.unique(image)) == len(indices)


def test_same_key_same_permutation_and_keys_differ():
    a = permute(np.arange(1000), 1000, 7)
    assert np.array_equal(a, permute(np.arange(1000), 1000, 7))
    assert not np.array_equal(a, permute(np.arange(1000), 1000, 8))
    assert not np.array_equal(a, np.arange(1000))  # it does shuffle


def test_vectorised_call_over_many_domains_equals_one_call_per_domain():
    sizes, keys = np.array([5, 1000, 1, 77]), np.array([11, 22, 33, 44], dtype=np.uint64)
    rng = np.random.default_rng(1)
    domains = rng.integers(0, 4, size=500)
    positions = np.array([rng.integers(0, sizes[d]) for d in domains])
    together = permute(positions, sizes[domains], keys[domains])
    for d in range(4):
        rows = domains == d
        assert np.array_equal(together[rows], permute(positions[rows], int(sizes[d]), int(keys[d])))


def test_block_bits_covers_n_within_a_factor_two():
    for n in [1, 2, 3, 4, 5, 16, 17, 1000, 2**40 + 1]:
        assert 2 ** block_bits(n) >= n and (n == 1 or 2 ** block_bits(n) < 2 * n)


def test_index_out_of_range_is_an_error():
    with pytest.raises(ValueError, match=r"\[0, n\)"):
        permute(np.array([5]), 5, 0)
