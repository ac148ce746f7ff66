"""Packed histograms (``cloud.ingest.histograms``) give back exactly the counts, row
sums and consistency that plain Python computes, in every layout; and the drift
partials of a batch are the sums of its windows (pure: no broker, no database)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from cloud.ingest.histograms import (
    MAX_COUNT,
    PackedHistogram,
    pack_histogram,
    unpack_histograms,
)
from shared.messages import PackedCounts

#: Mostly small counts (the one-byte layout), sometimes a wide one.
counts = st.one_of(
    st.integers(min_value=0, max_value=127),
    st.integers(min_value=0, max_value=127),
    st.integers(min_value=128, max_value=MAX_COUNT),
)


@st.composite
def histograms(draw: st.DrawFn) -> list[list[int]]:
    f = draw(st.sampled_from([1, 2, 3, 15, 16, 40, 230]))
    b = draw(st.sampled_from([0, 1, 2, 10, 15, 16, 64]))
    if draw(st.booleans()):  # all rows alike: consistent
        row = draw(st.lists(counts, min_size=b, max_size=b))
        return [list(row) for _ in range(f)]
    return [draw(st.lists(counts, min_size=b, max_size=b)) for _ in range(f)]


def _received(h: list[list[int]], as_device: bool) -> PackedHistogram | None:
    """``h`` as ingest holds it: packed from JSON lists, or as a device packed it."""
    if as_device and h[0]:
        counts = PackedCounts.of(h)  # u1 .. u8, whichever the largest count needs
        return counts.shape, f"<{counts.dtype}", counts.raw
    return pack_histogram(h)


@settings(max_examples=200, deadline=None)
@given(
    batch=st.lists(st.one_of(st.none(), histograms()), max_size=12),
    as_device=st.lists(st.booleans(), min_size=12, max_size=12),
)
def test_unpacked_batch_matches_plain_python(
    batch: list[list[list[int]] | None], as_device: list[bool]
) -> None:
    packed = [_received(h, d) if h else None for h, d in zip(batch, as_device, strict=False)]
    assert all(p is not None for p, h in zip(packed, batch, strict=True) if h)
    got = unpack_histograms(packed)
    for i, h in enumerate(batch):
        if not h:
            assert got.arrays[i] is None
            continue
        arr = got.arrays[i]
        assert arr is not None and arr.tolist() == h
        sums = {sum(row) for row in h}
        assert got.consistent[i] == (len(sums) == 1)
        assert got.samples[i] == sum(h[0])


def test_out_of_range_and_ragged_histograms_are_refused() -> None:
    assert pack_histogram([[1, -1]]) is None  # a negative fixint, one byte like the rest
    assert pack_histogram([[1, -40]]) is None
    assert pack_histogram([[MAX_COUNT + 1]]) is None
    assert pack_histogram([[2**64]]) is None
    assert pack_histogram([[1, 2], [3], [4, 5, 6]]) is None  # ragged, rectangle-sized
    assert pack_histogram([[1, 2], [3]]) is None
    big = [[0] * 10 for _ in range(0xE0)]  # outer length byte 0xe0 is not a count
    assert pack_histogram(big) is not None
    big[5][3] = -1
    assert pack_histogram(big) is None
