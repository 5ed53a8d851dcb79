"""The bare aiohttp responder: the ceiling that the read bench compares the API with.

Started by bench_reads as `python -m bench.common bare --port P --plain F --gzip F` (that
command line is kept for it; `main` here parses it): uvloop, no access log, no Redis, the
same stored bytes for every user id, so what it serves per second is what aiohttp itself can
do here.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def serve_bare(port: int, plain: bytes, gzipped: bytes) -> None:
    """The ceiling for the API: one route per encoding, the same bytes for any user id."""
    import uvloop
    from aiohttp import web

    from engine.process import stop_on_signals

    gzip_headers = {"Content-Encoding": "gzip", "Vary": "Accept-Encoding"}

    async def plain_handler(request: web.Request) -> web.Response:
        return web.Response(body=plain, content_type="application/json")

    async def gzip_handler(request: web.Request) -> web.Response:
        return web.Response(body=gzipped, content_type="application/json", headers=gzip_headers)

    async def serve() -> None:
        app = web.Application()
        app.router.add_get("/plain/{userId}", plain_handler)
        app.router.add_get("/gzip/{userId}", gzip_handler)
        app.router.add_get("/health", plain_handler)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
        with stop_on_signals() as stop:
            await stop.wait()
            await runner.cleanup()

    import setproctitle

    setproctitle.setproctitle("prefetch-bench: bare")
    uvloop.run(serve())


def main() -> None:
    """The `bare` command of `python -m bench.common` (bench/common.py hands its CLI here)."""
    parser = argparse.ArgumentParser(description="bench helpers")
    sub = parser.add_subparsers(dest="command", required=True)
    bare = sub.add_parser("bare", help="serve fixed bytes on /plain/{id} and /gzip/{id}")
    bare.add_argument("--port", type=int, required=True)
    bare.add_argument("--plain", type=Path, required=True)
    bare.add_argument("--gzip", type=Path, required=True)
    args = parser.parse_args()
    serve_bare(args.port, args.plain.read_bytes(), args.gzip.read_bytes())
