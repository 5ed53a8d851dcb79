"""The access line's cost: through a LogRecord (logging's machinery) against emit_fields.

Writes `--lines` access lines per round to a file through the service's handler
(engine.logs.configure, as `prefetch api` sets it up), once as an ordinary record with the
fields as extras (how api/access_log.py logged before) and once through
`engine.logs.emit_fields` (how it logs now), inside a running event loop so that the
batched writes happen as they do in the API. Prints the CPU time per line, median of
`--rounds`, for the JSON and the text format. Nothing is asserted.

    .venv/bin/python -m bench.bench_access_log --lines 20000 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import machine, print_table, save_result
from engine import logs

FIELDS = {
    "method": "GET",
    "route": "/api/cache/{userId}",
    "path": "/api/cache/550e8400-e29b-41d4-a716-446655440000",
    "status": 200,
    "duration_ms": 0.412,
    "bytes": 9304,
    "remote": "127.0.0.1",
    "request_id": "5f0c2a9e1b3d4c7a",
}
MESSAGE = f"GET {FIELDS['path']} 200"


async def per_line(write: Callable[[], None], lines: int, rounds: int) -> float:
    """Median CPU µs per line over `rounds` rounds of `lines` lines."""
    results = []
    for _ in range(rounds):
        started = time.process_time()
        for _ in range(lines):
            write()
        results.append((time.process_time() - started) / lines * 1e6)
        await asyncio.sleep(logs.FLUSH_S * 1.5)  # the batched lines' write lands between rounds
    return statistics.median(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    # As prefetch.cli._prepare sets logging up for a service process.
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    rows = []
    found = {}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("json", "text"):
            with open(Path(tmp) / f"access-{fmt}.log", "w") as out:
                logs.configure("INFO", fmt, "api", out)
                logger = logging.getLogger("access")
                extra = {"fields": tuple(FIELDS), **FIELDS}

                def record(logger: logging.Logger = logger, extra: dict[str, Any] = extra) -> None:
                    logger.info(MESSAGE, extra=extra)

                def fast(logger: logging.Logger = logger) -> None:
                    logs.emit_fields(logger, logging.INFO, MESSAGE, dict(FIELDS))

                before = asyncio.run(per_line(record, args.lines, args.rounds))
                after = asyncio.run(per_line(fast, args.lines, args.rounds))
                logs.configure("WARNING", "json", "prefetch")  # flushes and closes this one
                found[fmt] = {"record_us": before, "emit_fields_us": after}
                rows.append([fmt, f"{before:.1f}", f"{after:.1f}", f"{before / after:.1f}x"])
    print_table(["format", "LogRecord µs/line", "emit_fields µs/line", "ratio"], rows)
    payload = {"bench": "access_log", "args": vars(args), "machine": machine(), "results": found}
    print(f"saved {save_result('access-log', payload)}")


if __name__ == "__main__":
    main()
