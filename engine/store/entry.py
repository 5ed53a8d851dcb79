"""The stored form of a cache entry: standard gzip (ISA-L) or plain JSON, stamped with its entity
tag and expiry so that a read answers ETag and Cache-Control from fixed offsets (see `Stamp`).

engine/store/cache.py writes and reads entries through Redis; the API's views, the prefetcher
and the API's local copy (local_cache.py) take them apart with `unstamp`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from isal import igzip, isal_zlib

GZIP_MAGIC = b"\x1f\x8b"
# The stamp: 16 hex digits of entity tag, "-", 13 digits of expiry (epoch ms), then a NUL.
# In a gzip entry it is the header's FNAME field (flag 0x08 at byte 3), so the stored bytes
# stay one standard gzip member that every decoder reads and that goes out as is; a plain
# entry carries it as a prefix (a JSON body starts with "{", a stamp with a hex digit).
STAMP_BYTES = 30
_GZIP_HEAD = 10
_FNAME = 0x08
_STAMPED_GZIP = GZIP_MAGIC + b"\x08" + bytes([_FNAME])
_TAG = slice(0, 16)
_EXPIRES = slice(17, 30)
GZIP_TAG = slice(_GZIP_HEAD, _GZIP_HEAD + 16)
GZIP_EXPIRES = slice(_GZIP_HEAD + 17, _GZIP_HEAD + STAMP_BYTES)


def compress(body: bytes) -> bytes:
    """Standard gzip by ISA-L at level 2: on a 52 KB timeline about 110 µs and 8.8 KB, where
    zlib at level 1 takes 380 µs for 9.4 KB; the worker's CPU is what limits prefetch
    throughput (tuning.md, bench/bench_gzip.py)."""
    return igzip.compress(body, compresslevel=2, mtime=0)


def decompress(stored: bytes) -> bytes:
    """The plain JSON body of a stored entry, whatever its encoding (ISA-L reads any gzip,
    FNAME included, at about half zlib's cost)."""
    if stored[:2] == GZIP_MAGIC:
        return isal_zlib.decompress(stored, wbits=31)
    return bytes(unstamp(stored).payload)


@dataclass(frozen=True, slots=True)
class Stamp:
    """A stored entry taken apart for serving: nothing here is parsed but two fixed slices.

    `payload` is what goes on the wire (the gzip member itself, or the plain JSON after the
    prefix); `tag` the entity tag fixed when the entry was encoded (None for an entry stored
    without one); `expires_at` its expiry in epoch ms (0 when unknown).
    """

    payload: bytes | memoryview
    gzip: bool
    tag: str | None
    expires_at: int


def unstamp(stored: bytes) -> Stamp:
    """The parts of a stored entry (see `Stamp`)."""
    if stored[:2] == GZIP_MAGIC:
        if stored[3] == _FNAME and len(stored) > _GZIP_HEAD + STAMP_BYTES:
            tag = stored[GZIP_TAG].decode("ascii")
            return Stamp(stored, True, tag, int(stored[GZIP_EXPIRES]))
        return Stamp(stored, True, None, 0)
    if len(stored) > STAMP_BYTES and stored[STAMP_BYTES] == 0 and stored[:1] != b"{":
        tag = stored[_TAG].decode("ascii")
        return Stamp(memoryview(stored)[STAMP_BYTES + 1 :], False, tag, int(stored[_EXPIRES]))
    return Stamp(stored, False, None, 0)


def stamp(encoded: bytes, tag: str, expires_at: int) -> bytes:
    """`encoded` (a gzip member from `compress`, or plain JSON) with its stamp."""
    fields = b"%s-%013d\0" % (tag.encode("ascii"), expires_at)
    if len(fields) != STAMP_BYTES + 1:
        raise ValueError(f"an entity tag is 16 hex digits, not {tag!r}")
    if encoded[:2] == GZIP_MAGIC:
        if encoded[3] != 0:  # ISA-L and zlib write no optional header fields
            raise ValueError("gzip member already carries optional header fields")
        return b"".join((_STAMPED_GZIP, encoded[4:_GZIP_HEAD], fields, encoded[_GZIP_HEAD:]))
    return fields + encoded


def new_tag() -> str:
    """A new strong entity tag: 64 random bits, so no two stored entries share one."""
    return os.urandom(8).hex()
