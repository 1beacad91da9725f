"""GEOGRAPHY values as WKT text: BigQuery sends WKT; a server that sends WKB (the local emulator) is decoded here."""

from __future__ import annotations

import math
import struct

import pyarrow as pa

from bq_refresh.errors import SourceError

# OGC type codes (ISO WKB adds 1000 for Z, 2000 for M, 3000 for ZM; PostGIS's EWKB sets high bits instead).
_NAMES = {1: "POINT", 2: "LINESTRING", 3: "POLYGON", 4: "MULTIPOINT", 5: "MULTILINESTRING", 6: "MULTIPOLYGON",
          7: "GEOMETRYCOLLECTION"}
_EWKB_Z, _EWKB_M, _EWKB_SRID = 0x80000000, 0x40000000, 0x20000000


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def take(self, fmt: str) -> tuple[float | int, ...]:
        size = struct.calcsize(fmt)
        if self.at + size > len(self.data):
            raise ValueError(f"WKB ends at byte {len(self.data)}, {size} more wanted at byte {self.at}")
        values = struct.unpack_from(fmt, self.data, self.at)
        self.at += size
        return values


def _number(value: float) -> str:
    """A coordinate as BigQuery's ST_ASTEXT writes it: the shortest text that reads back as the same double,
    without a trailing ``.0``."""
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _geometry(r: _Reader) -> str:
    (order,) = r.take("B")
    if order not in (0, 1):
        raise ValueError(f"byte order {order} at byte {r.at - 1} (0 or 1 expected)")
    e = "<" if order == 1 else ">"
    code = int(r.take(e + "I")[0])
    dims = 2
    z = m = False
    if code & (_EWKB_Z | _EWKB_M | _EWKB_SRID):
        z, m = bool(code & _EWKB_Z), bool(code & _EWKB_M)
        if code & _EWKB_SRID:
            r.take(e + "I")  # the SRID: GEOGRAPHY is always WGS 84
        code &= 0x0FFFFFFF
    else:
        z, m = code // 1000 in (1, 3), code // 1000 in (2, 3)
        code %= 1000
    dims += z + m
    name = _NAMES.get(code)
    if name is None:
        raise ValueError(f"geometry type {code} (1 to 7 expected)")
    tag = name + (" ZM" if z and m else " Z" if z else " M" if m else "")
    point = e + "d" * dims

    def coords() -> str:
        return " ".join(_number(float(v)) for v in r.take(point))

    def ring() -> str:
        (n,) = r.take(e + "I")
        return "(" + ", ".join(coords() for _ in range(int(n))) + ")"

    if code == 1:
        values = r.take(point)
        if all(math.isnan(float(v)) for v in values):
            return tag + " EMPTY"
        return f"{tag}(" + " ".join(_number(float(v)) for v in values) + ")"
    if code == 2:
        text = ring()
        return tag + (" EMPTY" if text == "()" else text)
    (n,) = r.take(e + "I")
    if n == 0:
        return tag + " EMPTY"
    if code == 3:
        return f"{tag}(" + ", ".join(ring() for _ in range(int(n))) + ")"
    parts = [_geometry(r) for _ in range(int(n))]
    if code == 7:
        return f"{tag}(" + ", ".join(parts) + ")"
    # A multi-geometry's members are written without their own type name: MULTIPOINT(1 2, 3 4).
    inner = [p[p.index("("):] if "(" in p else "EMPTY" for p in parts]
    if code == 4:
        inner = [p[1:-1] if p != "EMPTY" else p for p in inner]
    return f"{tag}(" + ", ".join(inner) + ")"


def wkb_to_wkt(data: bytes) -> str:
    """One WKB (or PostGIS EWKB) geometry as WKT: Point, LineString, Polygon, their Multi forms and
    GeometryCollection, in 2D, Z, M or ZM, either byte order.

    Raises:
        ValueError: the bytes are not one whole WKB geometry.
    """
    reader = _Reader(bytes(data))
    text = _geometry(reader)
    if reader.at != len(reader.data):
        raise ValueError(f"{len(reader.data) - reader.at} byte(s) left after the geometry")
    return text


def wkb_array_to_wkt(array: pa.Array | pa.ChunkedArray, column: str) -> pa.Array:
    """A binary column of WKB geometries as WKT strings (NULL stays NULL).

    Raises:
        SourceError: a value is not valid WKB (names the column and the row).
    """
    out: list[str | None] = []
    for row, value in enumerate(array.to_pylist()):
        if value is None:
            out.append(None)
            continue
        try:
            out.append(wkb_to_wkt(value))
        except (ValueError, struct.error) as exc:
            raise SourceError(f"column {column!r}: GEOGRAPHY value at row {row} of the batch is not WKB ({exc})") from None
    return pa.array(out, pa.string())
