"""The `relay` command: api, worker, dev and sandbox."""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import signal
import sys

from relay.errors import ConfigError
from relay.logs import configure_logging
from relay.settings import load_settings
from relay.tracing import setup as tracing


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relay", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    api = commands.add_parser("api", help="the HTTP API on uvicorn")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=None, help="default: RELAY_API_PORT (8000)")
    commands.add_parser("worker", help="the arq worker: polling and delivery")
    commands.add_parser(
        "ack-data-loss",
        help="acknowledge a recorded loss of the relay's Redis data (readiness passes again)",
    )
    dev = commands.add_parser("dev", help="API, worker, Redis and a sandbox upstream in one go")
    dev.add_argument("--port", type=int, default=8000)
    sandbox = commands.add_parser("sandbox", help="the sandbox upstream alone")
    sandbox.add_argument("--host", default="127.0.0.1")
    sandbox.add_argument("--port", type=int, default=8100)
    return parser


def _freeze_start_up() -> None:
    """Put what start-up built (the modules, the app) out of the garbage collector's way.

    It lives as long as the process, yet every full collection walked it: ~80,000 objects in
    the API, which made the collector a tenth of a submission's CPU (bench/README.md). A
    process-wide setting, so only here, where a process starts a server: never in the app or
    the worker's code, which the tests run many times over in one process.
    """
    gc.collect()
    gc.freeze()


def _run_api(host: str, port: int | None) -> None:
    from relay.api.app import create_app
    from relay.serving import ProcessServer, api_config

    # The port it listens on is one callbacks may never reach.
    settings = load_settings(**({} if port is None else {"RELAY_API_PORT": port})).require("api")
    configure_logging(settings.log_format, settings.log_level)
    config = api_config(create_app(settings), settings, host=host, log_config=None)
    tracing.start("api")
    _freeze_start_up()
    try:
        ProcessServer(config).run()
    finally:
        tracing.stop()  # what is queued is exported before the process exits


def _run_worker() -> None:
    import uvloop

    from relay.worker.process import serve_worker

    settings = load_settings().require("worker")
    configure_logging(settings.log_format, settings.log_level)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve_worker(settings, stop, http_port=settings.worker_http_port)

    # On uvloop, as the API runs under uvicorn: a burst of callbacks is mostly event-loop work
    # (sockets, tasks, futures), which uvloop does for less CPU than asyncio's own loop (about
    # an eighth less per ended job in bench/burst.py).
    tracing.start("worker")
    _freeze_start_up()
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main())
    finally:
        tracing.stop()


def _ack_data_loss() -> int:
    from relay.redis.conn import close, connect
    from relay.redis.watch import acknowledge

    settings = load_settings()

    async def main() -> str | None:
        redis = connect(settings.redis_url, timeout=settings.redis_timeout)
        try:
            return await acknowledge(redis)
        finally:
            await close(redis)

    record = asyncio.run(main())
    print(f"acknowledged: {record}" if record else "no data loss was recorded")
    return 0


def _run_sandbox(host: str, port: int) -> None:
    import uvicorn

    from relay.sandbox import create_sandbox_app

    uvicorn.run(create_sandbox_app(), host=host, port=port)


def _has_devtools() -> bool:
    # The wheel (and so the image) leaves the sandbox and devtools out; a checkout has them.
    return all(importlib.util.find_spec(name) for name in ("relay.sandbox", "relay.devtools"))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in ("dev", "sandbox") and not _has_devtools():
        print(
            f"relay: `relay {args.command}` is development tooling, not installed here; "
            "run it from a checkout (uv run relay " + args.command + ")",
            file=sys.stderr,
        )
        return 2
    try:
        if args.command == "api":
            _run_api(args.host, args.port)
        elif args.command == "worker":
            _run_worker()
        elif args.command == "ack-data-loss":
            return _ack_data_loss()
        elif args.command == "dev":
            from relay.devtools.dev import run_dev

            tracing.start("dev")  # the API and the worker in one process: one tracer
            try:
                run_dev(args.port)
            finally:
                tracing.stop()
        else:
            _run_sandbox(args.host, args.port)
    except ConfigError as exc:
        print(f"relay: configuration error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
