"""The row hash: XXH64 over each row's canonical bytes, computed with numpy, the same for every Polars and
PyArrow version (the hashes kept in a target's side table outlive a library upgrade).

A row's canonical bytes are little-endian 64-bit words: one validity word per 64 columns (bit i set when
column i is not NULL), then each column's words in column order:

- integers, booleans, dates, times, timestamps: the value as an int64 (0 when NULL);
- floats: the float64 bit pattern (-0.0 and 0.0 differ, as they do in the source; every NaN is ``CANONICAL_NAN``);
- decimals: the unscaled two's-complement integer, 2 words (NUMERIC) or 4 (BIGNUMERIC), at the column's scale;
- strings and bytes: XXH64 of the bytes (UTF-8 for strings);
- lists: XXH64 of the element words in order (a NULL element is the word ``NULL_ELEMENT``, so an INT64 list
  holding that value where another holds a NULL hashes alike: BigQuery's arrays hold no NULL).

The row hash is XXH64 (seed ``SEED``) of those bytes. tests/test_rowhash.py checks the implementation against
the reference C library (the ``xxhash`` package) and pins golden values.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

VERSION = "xxh64-v1"  # in the side table's marker (load.ensure_rowhash): a new function makes the kept hashes go
SEED = 0x6271722D72656672  # fixed, so equal rows hash equal in every run and every version
NULL_ELEMENT = 0x9E3779B97F4A7C15  # a NULL inside a list
LONG_SEGMENT = 4096  # bytes: longer values go to the xxhash library one by one (see xxh64_segments)
CANONICAL_NAN = 0x7FF8000000000000  # NaN payloads differ between systems; a NaN is a NaN

_P1 = 0x9E3779B185EBCA87
_P2 = 0xC2B2AE3D27D4EB4F
_P3 = 0x165667B19E3779F9
_P4 = 0x85EBCA77C2B2AE63
_P5 = 0x27D4EB2F165667C5
_M64 = (1 << 64) - 1
U64 = np.dtype("<u8")
Words = np.ndarray[Any, np.dtype[np.uint64]]


def _rotl(x: Words, r: int) -> Words:
    return (x << np.uint64(r)) | (x >> np.uint64(64 - r))


def _round(acc: Words, lane: Words) -> Words:
    """XXH64's round, in place on ``acc`` (returned)."""
    tmp = lane * np.uint64(_P2)
    acc += tmp
    np.right_shift(acc, np.uint64(33), out=tmp)
    acc <<= np.uint64(31)
    acc |= tmp
    acc *= np.uint64(_P1)
    return acc


def _merge(h: Words, v: Words) -> Words:
    h ^= _round(np.zeros_like(v), v)
    h *= np.uint64(_P1)
    h += np.uint64(_P4)
    return h


def _avalanche(h: Words) -> Words:
    h ^= h >> np.uint64(33)
    h *= np.uint64(_P2)
    h ^= h >> np.uint64(29)
    h *= np.uint64(_P3)
    h ^= h >> np.uint64(32)
    return h


def _tail_word(h: Words, word: Words) -> Words:
    """One 8-byte word past the last stripe, in place on ``h``."""
    h ^= _round(np.zeros_like(word), word)
    tmp = h >> np.uint64(37)
    h <<= np.uint64(27)
    h |= tmp
    h *= np.uint64(_P1)
    h += np.uint64(_P4)
    return h


def xxh64_lanes(lanes: list[Words], seed: int = SEED) -> Words:
    """XXH64 of each row of 8-byte words given column by column (``lanes``: m arrays of n uint64): the hash of
    the row's 8*m little-endian bytes."""
    m = len(lanes)
    n = lanes[0].size if m else 0
    stripes = m // 4
    if stripes:
        v = [np.full(n, (seed + _P1 + _P2) & _M64, U64), np.full(n, (seed + _P2) & _M64, U64),
             np.full(n, seed & _M64, U64), np.full(n, (seed - _P1) & _M64, U64)]
        for s in range(stripes):
            for lane in range(4):
                _round(v[lane], lanes[4 * s + lane])
        h = _rotl(v[0], 1) + _rotl(v[1], 7) + _rotl(v[2], 12) + _rotl(v[3], 18)
        for acc in v:
            _merge(h, acc)
    else:
        h = np.full(n, (seed + _P5) & _M64, U64)
    h += np.uint64((8 * m) & _M64)
    for j in range(4 * stripes, m):
        _tail_word(h, lanes[j])
    return _avalanche(h)


def xxh64_words(words: Words, seed: int = SEED) -> Words:
    """XXH64 of each row of ``words`` (shape (n, m), uint64): the hash of its 8*m little-endian bytes."""
    return xxh64_lanes([np.ascontiguousarray(words[:, j]) for j in range(words.shape[1])], seed)


def xxh64_segments(data: np.ndarray[Any, Any], offsets: np.ndarray[Any, Any], seed: int = SEED) -> Words:
    """XXH64 of each byte segment ``data[offsets[i]:offsets[i + 1]]`` (data: uint8, offsets: n + 1 integers).

    Segments longer than ``LONG_SEGMENT`` bytes (a large JSON or GEOGRAPHY value) are hashed one by one by the
    ``xxhash`` library's C XXH64; the others together, here.
    """
    offsets = np.asarray(offsets, np.int64)
    start = offsets[:-1]
    length = offsets[1:] - start
    long_rows = np.flatnonzero(length > LONG_SEGMENT)
    if not long_rows.size:
        return _xxh64_spans(data, start, length, seed)
    import xxhash

    out = np.empty(start.size, U64)
    for i in long_rows.tolist():
        out[i] = xxhash.xxh64_intdigest(data[int(start[i]): int(start[i] + length[i])].data, seed=seed)
    short = np.flatnonzero(length <= LONG_SEGMENT)
    out[short] = _xxh64_spans(data, start[short], length[short], seed)
    return out


def _xxh64_spans(data: np.ndarray[Any, Any], start: np.ndarray[Any, Any], length: np.ndarray[Any, Any],
                 seed: int) -> Words:
    """XXH64 of each span ``data[start[i]:start[i] + length[i]]``, vectorised over the spans."""
    n = start.size
    h = np.full(n, (seed + _P5) & _M64, U64)
    if not n:
        return h
    lo, hi = int(start.min()), int((start + length).max())
    size = hi - lo
    buf = np.zeros((size // 8 + 2) * 8, np.uint8)  # whole words, padded: a read past a segment's end stays inside
    buf[:size] = data[lo:hi]
    aligned = buf.view(U64)
    start = start - lo

    def word(at: np.ndarray[Any, Any]) -> Words:
        """The 8 bytes at each byte position ``at``, as a little-endian word (two aligned reads)."""
        q = at >> 3
        shift = (at & 7).astype(U64) << np.uint64(3)
        out: Words = aligned[q] >> shift
        out |= (aligned[q + 1] << (np.uint64(63) - shift)) << np.uint64(1)  # 0 when the word is aligned
        return out

    # Sorted by the length past the last stripe, longest first: each 8-byte tail word's rows are a prefix.
    order = np.argsort(-(length & 31).astype(np.int8), kind="stable")
    start, length = start[order], length[order]
    stripes = length >> 5
    rows = np.flatnonzero(stripes)
    if rows.size:
        base, count = start[rows], stripes[rows]
        v = [np.full(rows.size, (seed + _P1 + _P2) & _M64, U64), np.full(rows.size, (seed + _P2) & _M64, U64),
             np.full(rows.size, seed & _M64, U64), np.full(rows.size, (seed - _P1) & _M64, U64)]
        for s in range(int(count.max())):
            active = np.flatnonzero(count > s)
            for i in range(4):
                v[i][active] = _round(v[i][active], word(base[active] + (32 * s + 8 * i)))
        acc = _rotl(v[0], 1) + _rotl(v[1], 7) + _rotl(v[2], 12) + _rotl(v[3], 18)
        for lane in v:
            _merge(acc, lane)
        h[rows] = acc
    h += length.astype(U64)
    left = length & 31
    at = start + (length - left)
    for j in range(3):  # 8-byte words: up to 3 per segment, on a prefix
        k = int(np.count_nonzero(left >= 8 * (j + 1)))
        if not k:
            break
        _tail_word(h[:k], word(at[:k] + 8 * j))
    at += left & ~7
    rows = np.flatnonzero(left & 4)
    if rows.size:
        k4 = h[rows] ^ ((word(at[rows]) & np.uint64(0xFFFFFFFF)) * np.uint64(_P1))
        h[rows] = _rotl(k4, 23) * np.uint64(_P2) + np.uint64(_P3)
    at += left & 4
    for b in range(3):  # single bytes: up to 3
        rows = np.flatnonzero((left & 3) > b)
        if not rows.size:
            break
        k1 = h[rows] ^ (buf[at[rows] + b].astype(U64) * np.uint64(_P5))
        h[rows] = _rotl(k1, 11) * np.uint64(_P1)
    out = np.empty(n, U64)
    out[order] = _avalanche(h)
    return out


def _fixed_lanes(arr: pa.Array, width: int) -> list[Words]:
    """The ``width`` words of each value of a fixed-width array (the slice's own, offset applied), lane by lane."""
    buf = arr.buffers()[1]
    assert buf is not None
    values = np.frombuffer(buf, U64)[arr.offset * width: (arr.offset + len(arr)) * width].reshape(len(arr), width)
    return [np.ascontiguousarray(values[:, j]) for j in range(width)]


def _valid(arr: pa.Array) -> np.ndarray[Any, np.dtype[np.bool_]]:
    if arr.null_count == 0:
        return np.ones(len(arr), bool)
    return np.asarray(arr.is_valid().to_numpy(zero_copy_only=False), bool)


def column_lanes(arr: pa.Array) -> list[Words]:
    """The canonical words of one column's values, lane by lane (each n uint64); NULL values' words are 0."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    t = arr.type
    if pa.types.is_floating(t):
        floats = np.asarray(arr.cast(pa.float64()).fill_null(0.0).to_numpy(zero_copy_only=False), np.float64)
        bits = floats.view(U64)
        nan = np.isnan(floats)
        if nan.any():
            bits = np.where(nan, np.uint64(CANONICAL_NAN), bits)
        return [bits]
    if pa.types.is_boolean(t) or pa.types.is_integer(t) or pa.types.is_temporal(t) and t.bit_width <= 64:
        as_int = arr.view(pa.int64()) if t.bit_width == 64 and not pa.types.is_boolean(t) else _as_int64(arr)
        return [np.asarray(as_int.fill_null(0).to_numpy(zero_copy_only=False), np.int64).view(U64)]
    if pa.types.is_decimal(t):
        lanes = _fixed_lanes(arr, t.byte_width // 8)
    elif pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t):
        lanes = [_bytes_hash(arr)]
    elif pa.types.is_list(t) or pa.types.is_large_list(t):
        lanes = [_list_hash(arr)]
    else:  # the column types of tasks/typemap.py have none other (a STRUCT or an INTERVAL arrives as text)
        raise TypeError(f"no canonical bytes for Arrow type {t}")
    if arr.null_count:
        valid = _valid(arr)
        lanes = [np.where(valid, lane, np.uint64(0)) for lane in lanes]
    return lanes


def _as_int64(arr: pa.Array) -> pa.Array:
    t = arr.type
    if pa.types.is_boolean(t) or pa.types.is_integer(t):
        return arr.cast(pa.int64())
    storage = pa.int32() if t.bit_width == 32 else pa.int64()
    return arr.view(storage).cast(pa.int64())


def _bytes_hash(arr: pa.Array) -> Words:
    t = arr.type
    large = pa.types.is_large_string(t) or pa.types.is_large_binary(t)
    offsets = np.frombuffer(arr.buffers()[1], np.int64 if large else np.int32)[arr.offset: arr.offset + len(arr) + 1]
    data_buf = arr.buffers()[2]
    data = np.frombuffer(data_buf, np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    return xxh64_segments(data, offsets)


def _list_hash(arr: pa.Array) -> Words:
    offsets = np.asarray(arr.offsets.to_numpy(zero_copy_only=False), np.int64)
    values = arr.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
    lanes = column_lanes(values)
    if values.null_count:
        valid = _valid(values)
        lanes = [np.where(valid, lane, np.uint64(NULL_ELEMENT)) for lane in lanes]
    width = len(lanes)
    flat = np.ascontiguousarray(np.stack(lanes, axis=1)).view(np.uint8).ravel()
    return xxh64_segments(flat, (offsets - offsets[0]) * 8 * width)


def row_lanes(columns: list[pa.Array]) -> list[Words]:
    """Each row's canonical words, lane by lane: the validity words, then every column's words."""
    n = len(columns[0]) if columns else 0
    lanes: list[Words] = []
    for first in range(0, max(len(columns), 1), 64):
        bits = np.zeros(n, U64)
        for i, arr in enumerate(columns[first: first + 64]):
            if arr.null_count:
                bits |= _valid(arr).astype(U64) << np.uint64(i)
            else:
                bits |= np.uint64(1 << i)
        lanes.append(bits)
    for arr in columns:
        lanes.extend(column_lanes(arr))
    return lanes


def row_hashes(columns: list[pa.Array]) -> pa.Array:
    """The row hash of each row of ``columns`` (arrays of equal length), as int64 (a bigint column)."""
    n = len(columns[0]) if columns else 0
    if n == 0:
        return pa.array([], pa.int64())
    return pa.array(xxh64_lanes(row_lanes(columns)).view(np.int64), pa.int64())
