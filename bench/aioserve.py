"""aiohttp apps on loopback ports, all in one process: the benches' receivers and stand-ins."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web


def post_app(
    path: str, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.Application:
    app = web.Application()
    app.router.add_post(path, handler)
    return app


async def serve_forever(apps: list[tuple[web.Application, int]]) -> None:
    for app, port in apps:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
    await asyncio.Event().wait()
