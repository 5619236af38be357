"""Weight options and KV formats: exact bytes, as the format spec in planner/formats.py states."""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings, strategies as st

from planner.formats import KV_FORMATS, OPTIONS, FormatError, parse_option


def test_options_span_about_2_to_8_bpw():
    bpws = [o.nominal_bpw for o in OPTIONS]
    assert 20 <= len(OPTIONS) <= 30 and min(bpws) == pytest.approx(2.125) and max(bpws) == pytest.approx(8.5)


@pytest.mark.parametrize("name, bpw", [("1:4b g128", 4.125), ("1:4b g32", 4.5), ("1:2b g128", 2.125),
                                       ("0.1:4b/0.9:3b g128", 3.225), ("1:8b g128", 8.125)])
def test_nominal_bpw_counts_the_scales(name, bpw):
    assert parse_option(name).nominal_bpw == pytest.approx(bpw)


def test_exact_bytes_of_a_uniform_tensor():
    # 4096 x 4096 at 4 bits, group 128: 4096 rows x 4096/32 units x 4 words x 4 bytes, fp16 scale per
    # (row, group), one 12-byte slice header, no permutation
    expected = 4096 * (4096 // 32) * 4 * 4 + 4096 * (4096 // 128) * 2 + 12
    assert parse_option("1:4b g128").tensor_bytes(4096, 4096) == expected


def test_mixed_tensor_carries_its_permutation():
    o = parse_option("0.25:3b/0.75:2b g128")
    rows = o.slice_rows(1024)
    assert rows == ((256, 3), (768, 2))
    values = sum(512 * math.ceil(r / 32) * b * 4 for r, b in rows)
    scales = sum(512 * math.ceil(r / 128) * 2 for r, _ in rows)
    assert o.tensor_bytes(512, 1024) == values + scales + 2 * 12 + 1024 * 4


@given(st.sampled_from(OPTIONS), st.integers(1, 70_000))
@settings(max_examples=300, deadline=None)
def test_slices_cover_the_input_exactly(option, k):
    rows = option.slice_rows(k)
    assert sum(r for r, _ in rows) == k and all(r > 0 for r, _ in rows)
    assert all(r % option.group_size == 0 for r, _ in rows[:-1])


@given(st.sampled_from(OPTIONS), st.integers(1, 4096), st.integers(1, 8192))
@settings(max_examples=200, deadline=None)
def test_bytes_at_least_the_packed_bits(option, n, k):
    low = sum(n * r * b for r, b in option.slice_rows(k)) / 8
    assert option.tensor_bytes(n, k) >= low


def test_kv_block_sizes_are_the_real_ones():
    assert KV_FORMATS["q8"].row_bytes(32) == 34        # q8_0: 32 int8 + fp16 scale
    assert KV_FORMATS["q4"].row_bytes(32) == 18        # q4_0: 16 bytes + fp16 scale
    assert KV_FORMATS["fp16"].row_bytes(128) == 256
    assert KV_FORMATS["q8"].row_bytes(96) == 3 * 34


@pytest.mark.parametrize("text", ["4b g128", "1:4b", "1:7b g128", "0.5:4b/0.4:3b g128", "1:4b g100", ""])
def test_bad_option_names_are_rejected(text):
    with pytest.raises(FormatError):
        parse_option(text)
