"""The row hash (tasks/rowhash.py): XXH64 as the reference C library computes it, over canonical bytes
rebuilt here row by row with struct and the ``xxhash`` package (no code shared with the product), pinned by
golden values so that a library upgrade that changes any hash fails here first."""

from __future__ import annotations

import math
import random
import struct
import subprocess
import sys
from datetime import UTC, date, datetime, time
from decimal import Decimal, localcontext
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from tasks import rowhash

pytestmark = pytest.mark.once  # no database

ROOT = Path(__file__).resolve().parent.parent
SEED = 0x6271722D72656672  # written out: the seed is part of the pinned function


def reference_segments(segments: list[bytes], seed: int = SEED) -> list[int]:
    return [xxhash.xxh64_intdigest(s, seed=seed) for s in segments]


def as_segments(segments: list[bytes]) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    data = np.frombuffer(b"".join(segments), np.uint8)
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in segments], dtype=np.int64)])
    return data, offsets


@pytest.mark.parametrize("seed", [0, SEED, (1 << 64) - 1])
def test_segments_match_the_reference_library_at_every_length(seed: int) -> None:
    rng = random.Random(seed & 0xFFFF)
    segments = [rng.randbytes(length) for length in range(0, 300)] + [rng.randbytes(rng.randrange(0, 130))
                                                                      for _ in range(2000)]
    rng.shuffle(segments)
    got = rowhash.xxh64_segments(*as_segments(segments), seed=seed)
    assert [int(h) for h in got] == reference_segments(segments, seed)


@given(st.lists(st.binary(max_size=100), max_size=40))
@settings(max_examples=200, deadline=None)
def test_segments_match_the_reference_library_for_any_bytes(segments: list[bytes]) -> None:
    got = rowhash.xxh64_segments(*as_segments(segments))
    assert [int(h) for h in got] == reference_segments(segments)


def test_long_segments_among_short_ones_match_the_reference_library() -> None:
    rng = random.Random(4096)
    segments = [rng.randbytes(n) for n in (4095, 4096, 4097, 0, 5, 100_000, 31, 2_000_000, 33)]
    got = rowhash.xxh64_segments(*as_segments(segments))
    assert [int(h) for h in got] == reference_segments(segments)


def test_segments_in_the_middle_of_a_buffer_read_only_their_bytes() -> None:
    data = np.frombuffer(b"\xff" * 37 + b"abc" + b"\xee" * 41, np.uint8)
    assert int(rowhash.xxh64_segments(data, np.array([37, 40]))[0]) == xxhash.xxh64_intdigest(b"abc", seed=SEED)


@pytest.mark.parametrize("width", [1, 2, 3, 4, 5, 7, 8, 9, 31, 38, 64])
def test_words_match_the_reference_library(width: int) -> None:
    words = np.random.default_rng(width).integers(0, 1 << 63, size=(64, width), dtype=np.int64).view(np.uint64)
    words[0] = np.uint64((1 << 64) - 1)
    got = rowhash.xxh64_words(words)
    assert [int(h) for h in got] == [xxhash.xxh64_intdigest(words[i].tobytes(), seed=SEED) for i in range(64)]


# --- the canonical bytes, rebuilt value by value --------------------------------------------------------------

def word(value: int) -> bytes:
    return struct.pack("<Q", value & ((1 << 64) - 1))


def canonical(value: Any, t: pa.DataType) -> bytes:
    """The words of one non-NULL value, as tasks/rowhash.py's docstring defines them."""
    if pa.types.is_floating(t):
        return word(0x7FF8000000000000) if math.isnan(value) else struct.pack("<d", value)
    if pa.types.is_boolean(t):
        return word(int(value))
    if pa.types.is_integer(t):
        return word(value)
    if pa.types.is_date32(t):
        return word((value - date(1970, 1, 1)).days)
    if pa.types.is_timestamp(t):
        naive = value.replace(tzinfo=None) if value.tzinfo is None else value.astimezone(UTC).replace(tzinfo=None)
        delta = naive - datetime(1970, 1, 1)
        return word((delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds)
    if pa.types.is_time64(t):
        return word(((value.hour * 60 + value.minute) * 60 + value.second) * 1_000_000 + value.microsecond)
    if pa.types.is_decimal(t):
        with localcontext(prec=100):  # the default 28 digits would round a NUMERIC's 38
            unscaled = int(value.scaleb(t.scale))
        return unscaled.to_bytes(t.byte_width, "little", signed=True)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return word(xxhash.xxh64_intdigest(value.encode(), seed=SEED))
    if pa.types.is_binary(t):
        return word(xxhash.xxh64_intdigest(value, seed=SEED))
    if pa.types.is_list(t):
        inner = b"".join(word(0x9E3779B97F4A7C15) * (t.value_type.byte_width // 8 if pa.types.is_decimal(t.value_type)
                                                       else 1) if v is None else canonical(v, t.value_type)
                         for v in value)
        return word(xxhash.xxh64_intdigest(inner, seed=SEED))
    raise AssertionError(t)


def null_words(t: pa.DataType) -> bytes:
    return b"\0" * (t.byte_width if pa.types.is_decimal(t) else 8)


def reference_row_hashes(table: pa.Table) -> list[int]:
    out = []
    for row in table.to_pylist():
        validity = [0] * ((table.num_columns + 63) // 64 or 1)  # one word per 64 columns
        body = b""
        for i, f in enumerate(table.schema):
            value = row[f.name]
            if value is not None:
                validity[i // 64] |= 1 << (i % 64)
            body += null_words(f.type) if value is None else canonical(value, f.type)
        out.append(xxhash.xxh64_intdigest(b"".join(word(v) for v in validity) + body, seed=SEED))
    return out


EVERY_TYPE = pa.schema([  # the Arrow types of tasks/typemap.py's columns
    ("i", pa.int64()), ("f", pa.float64()), ("n", pa.decimal128(38, 9)), ("bn", pa.decimal256(76, 38)),
    ("b", pa.bool_()), ("s", pa.string()), ("y", pa.binary()), ("d", pa.date32()), ("dt", pa.timestamp("us")),
    ("ts", pa.timestamp("us", tz="UTC")), ("t", pa.time64("us")), ("li", pa.list_(pa.int64())),
    ("ls", pa.list_(pa.string())), ("ln", pa.list_(pa.decimal128(38, 9))), ("lf", pa.list_(pa.float64())),
])


def every_type_rows() -> pa.Table:
    rows = [
        {"i": 1, "f": 0.1, "n": Decimal("1.5"), "bn": Decimal("-12345678901234567890.123"), "b": True,
         "s": "B07XJ8C8F5", "y": b"\x00\x01", "d": date(2026, 11, 29), "dt": datetime(2026, 11, 29, 2, 0),
         "ts": datetime(2026, 11, 29, 2, 0, tzinfo=UTC), "t": time(23, 59, 59, 999999),
         "li": [1, 2, 3], "ls": ["a", "", "é"], "ln": [Decimal("0.000000001")], "lf": [-0.0, 1e300]},
        {k: None for k in EVERY_TYPE.names},
        {"i": 0, "f": 0.0, "n": Decimal(0), "bn": Decimal(0), "b": False, "s": "", "y": b"", "d": date(1970, 1, 1),
         "dt": datetime(1970, 1, 1), "ts": datetime(1970, 1, 1, tzinfo=UTC), "t": time(0), "li": [],
         "ls": [], "ln": [], "lf": []},
        {"i": -(1 << 63), "f": -0.0, "n": Decimal("-99999999999999999999999999999.999999999"),
         "bn": Decimal("1E-38"), "b": None, "s": "x" * 100, "y": bytes(range(256)), "d": date(1, 1, 1),
         "dt": datetime(9999, 12, 31, 23, 59, 59, 999999), "ts": None, "t": None, "li": [None, 5],
         "ls": [None], "ln": [None, Decimal(1)], "lf": [float("nan")]},
    ]
    return pa.Table.from_pylist(rows, schema=EVERY_TYPE)


def test_every_type_hashes_its_canonical_bytes() -> None:
    table = every_type_rows()
    got = rowhash.row_hashes(table.columns).to_pylist()
    want = [h - (1 << 64) if h >= 1 << 63 else h for h in reference_row_hashes(table)]
    assert got == want


def test_a_row_of_more_than_64_columns_has_a_second_validity_word() -> None:
    rng = random.Random(70)
    columns = {f"c{i}": pa.array([None if rng.random() < 0.3 else rng.randrange(-5, 5) for _ in range(50)], pa.int64())
               for i in range(70)}
    columns["c65"] = pa.array([None, 0] * 25, pa.int64())  # NULL and 0 differ in the second word only
    table = pa.table(columns)
    want = [h - (1 << 64) if h >= 1 << 63 else h for h in reference_row_hashes(table)]
    assert rowhash.row_hashes(table.columns).to_pylist() == want


def test_a_slice_a_chunked_column_and_large_types_hash_as_the_plain_rows() -> None:
    table = every_type_rows()
    whole = rowhash.row_hashes(table.columns).to_pylist()
    assert rowhash.row_hashes(table.slice(1, 2).columns).to_pylist() == whole[1:3]
    assert rowhash.row_hashes([pa.chunked_array(c.slice(0, 2).chunks + c.slice(2).chunks) for c in table.columns]
                              ).to_pylist() == whole
    s = table.column("s")
    assert (rowhash.row_hashes([s.cast(pa.large_string())]).to_pylist()
            == rowhash.row_hashes([s]).to_pylist())


@pytest.mark.parametrize(("a", "b", "t"), [
    (0.0, -0.0, pa.float64()),  # different values in the source; PostgreSQL keeps the sign too
    (None, 0, pa.int64()),
    (None, "", pa.string()),
    ([1], [1, None], pa.list_(pa.int64())),
    ([None], [], pa.list_(pa.int64())),
    (["ab", "c"], ["a", "bc"], pa.list_(pa.string())),
    (Decimal("1.0"), Decimal("1.000000001"), pa.decimal128(38, 9)),
])
def test_values_that_differ_hash_differently(a: Any, b: Any, t: pa.DataType) -> None:
    ha, hb = rowhash.row_hashes([pa.array([a], t)]), rowhash.row_hashes([pa.array([b], t)])
    assert ha != hb


def test_every_nan_is_one_value_and_two_columns_are_not_one() -> None:
    quiet, payload = np.array([np.nan, np.frombuffer(struct.pack("<Q", 0x7FF0000000000F01), np.float64)[0]])
    assert math.isnan(payload)
    assert len(set(rowhash.row_hashes([pa.array([quiet, payload])]).to_pylist())) == 1
    one = rowhash.row_hashes([pa.array(["ab"]), pa.array(["c"])])
    other = rowhash.row_hashes([pa.array(["a"]), pa.array(["bc"])])
    assert one != other


# Pinned: these numbers change only with tasks/rowhash.py's VERSION (a new version stages every row once).
GOLDEN = [-3138907599226995914, 7945737781678272497, 264954490598845202, 6182365682447977453]


def test_golden_values() -> None:
    assert rowhash.VERSION == "xxh64-v1"
    assert rowhash.row_hashes(every_type_rows().columns).to_pylist() == GOLDEN


def test_the_row_hash_needs_no_polars() -> None:
    """Hashes that outlive a Polars upgrade: the function does not even import it."""
    code = ("import sys; sys.modules['polars'] = None\n"
            "import pyarrow as pa\nfrom tasks import rowhash\n"
            "print(rowhash.row_hashes([pa.array([1, None]), pa.array(['a', 'b'])]).to_pylist())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(rowhash.row_hashes([pa.array([1, None]), pa.array(["a", "b"])]).to_pylist())


def test_a_type_without_canonical_bytes_is_refused_by_name() -> None:
    with pytest.raises(TypeError, match="struct<a: int64>"):
        rowhash.row_hashes([pa.array([{"a": 1}])])
