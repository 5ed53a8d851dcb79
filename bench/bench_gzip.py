"""gzip libraries on real cached timelines: compress µs, size, decompress µs.

Builds `--users` cached entries exactly as a worker stores them (`wire.cached_body` of the
sandbox's 100-post timelines, about 53 KB of JSON each), then for each candidate measures, per
entry: CPU time to compress, the compressed size, and CPU time to decompress it (what a
client without gzip costs the read path). Every candidate's output is checked to be standard
gzip that Python's zlib reads back to the same bytes. Nothing is asserted; the numbers and
the choice are in tuning.md.

    .venv/bin/python -m bench.bench_gzip --users 200 --rounds 3
"""

from __future__ import annotations

import argparse
import functools
import gzip
import statistics
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass

from bench.common import machine, print_table, save_result
from engine.wire import cached_body
from sandbox import generate_posts

Codec = tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]


def _at_level(compress: Callable[[bytes, int], bytes], level: int) -> Callable[[bytes], bytes]:
    return lambda body: compress(body, level)


def candidates() -> dict[str, Codec]:
    """name -> (compress, decompress); libraries that are not installed are left out."""
    found: dict[str, Codec] = {
        "zlib level 1": (
            lambda b: gzip.compress(b, compresslevel=1, mtime=0),
            lambda b: zlib.decompress(b, wbits=31),
        ),
        "zlib level 6": (
            lambda b: gzip.compress(b, compresslevel=6, mtime=0),
            lambda b: zlib.decompress(b, wbits=31),
        ),
    }
    try:
        from isal import igzip, isal_zlib

        for level in (0, 1, 2):
            found[f"isal level {level}"] = (
                functools.partial(igzip.compress, compresslevel=level, mtime=0),
                functools.partial(isal_zlib.decompress, wbits=31),
            )
    except ImportError:
        pass
    try:
        import deflate

        for level in (1, 4, 6):
            found[f"libdeflate level {level}"] = (
                _at_level(deflate.gzip_compress, level),
                deflate.gzip_decompress,
            )
    except ImportError:
        pass
    return found


@dataclass
class Figure:
    name: str
    compress_us: float
    size_kb: float
    ratio: float
    decompress_us: float


def measure(name: str, codec: Codec, bodies: list[bytes], rounds: int) -> Figure:
    compress, decompress = codec
    packed = [compress(body) for body in bodies]
    for body, out in zip(bodies, packed, strict=True):
        if out[:2] != b"\x1f\x8b" or zlib.decompress(out, wbits=31) != body:
            raise SystemExit(f"{name}: not standard gzip of the input")
    comp, decomp = [], []
    for _ in range(rounds):
        started = time.process_time()
        for body in bodies:
            compress(body)
        comp.append((time.process_time() - started) / len(bodies) * 1e6)
        started = time.process_time()
        for out in packed:
            decompress(out)
        decomp.append((time.process_time() - started) / len(bodies) * 1e6)
    size = statistics.mean(len(p) for p in packed)
    return Figure(
        name,
        statistics.median(comp),
        size / 1024,
        statistics.mean(len(b) for b in bodies) / size,
        statistics.median(decomp),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    now = int(time.time() * 1000)
    bodies = [
        cached_body(generate_posts(str(uuid.uuid4()), 100), now, "warm", cached=True)
        for _ in range(args.users)
    ]
    print(f"{args.users} entries, {statistics.mean(map(len, bodies)) / 1024:.1f} KB JSON each")
    figures = [measure(n, c, bodies, args.rounds) for n, c in candidates().items()]
    print_table(
        ["library", "compress µs", "size KB", "ratio", "decompress µs"],
        [
            [
                f.name,
                f"{f.compress_us:.0f}",
                f"{f.size_kb:.2f}",
                f"{f.ratio:.2f}",
                f"{f.decompress_us:.0f}",
            ]
            for f in figures
        ],
    )
    payload = {
        "bench": "gzip",
        "args": vars(args),
        "machine": machine(),
        "figures": [asdict(f) for f in figures],
    }
    print(f"saved {save_result('gzip', payload)}")


if __name__ == "__main__":
    main()
