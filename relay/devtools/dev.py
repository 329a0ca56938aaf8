"""`relay dev`: the whole relay on a laptop, in one process and one command.

Whatever is not configured is provided: a real redis-server child process when RELAY_REDIS_URL is
unset, the sandbox upstream when CHAMELAION_API_KEY is unset, a dev API key and webhook secret,
a callback policy that admits loopback, and an inbox that verifies and shows callbacks.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import secrets
import signal
from typing import Any

from relay.api.app import create_app
from relay.devtools.embedded_redis import embedded_redis
from relay.devtools.inbox import create_inbox_app
from relay.logs import configure_logging
from relay.redis.conn import redacted
from relay.serving import EmbeddedServer, embedded_server
from relay.settings import Settings, load_settings
from relay.worker.process import serve_worker

SANDBOX_KEY = "sandbox-key"


def _banner(
    settings: Settings,
    port: int,
    inbox: str,
    sandboxed: bool,
    own_redis: bool,
    generated_key: str | None,
) -> str:
    # A key from the environment is the operator's secret: never printed, only named.
    shown = generated_key or "one of RELAY_API_KEYS"
    key = generated_key or "<one of RELAY_API_KEYS>"
    upstream = (
        f"{settings.chamelaion_base_url} (sandbox)" if sandboxed else settings.chamelaion_base_url
    )
    redis_note = " (embedded, discarded on exit)" if own_redis else ""
    return f"""
chamelaion-relay dev
  API       http://127.0.0.1:{port}/api   (key: {shown})
  upstream  {upstream}
  redis     {redacted(settings.redis_url)}{redis_note}
  inbox     {inbox}   (GET it to see verified callbacks)

Try it:
  curl -s http://127.0.0.1:{port}/api/v1/lipsync/generate \\
    -H 'x-api-key: {key}' -H 'content-type: application/json' \\
    -d '{{"inputs": [{{"type": "video", "url": "https://cdn.example.com/a.mp4"}},
                  {{"type": "audio", "url": "https://cdn.example.com/a.wav"}}],
         "callback_url": "{inbox}"}}'
  curl -s {inbox}
Ctrl-C stops everything.
"""


def run_dev(port: int) -> None:
    configure_logging("text")
    asyncio.run(_dev(port))


async def _dev(port: int) -> None:
    overrides: dict[str, Any] = {}
    servers: list[EmbeddedServer] = []
    sandbox_port, inbox_port = port + 1, port + 2
    with contextlib.ExitStack() as stack:
        own_redis = "RELAY_REDIS_URL" not in os.environ
        if own_redis:
            overrides["RELAY_REDIS_URL"] = stack.enter_context(
                embedded_redis(avoid=(port, sandbox_port, inbox_port))
            )
        sandboxed = "CHAMELAION_API_KEY" not in os.environ
        if sandboxed:
            from relay.sandbox import SandboxConfig, create_sandbox_app

            overrides["CHAMELAION_API_KEY"] = SANDBOX_KEY
            overrides["CHAMELAION_BASE_URL"] = f"http://127.0.0.1:{sandbox_port}/api"
            sandbox = create_sandbox_app(SandboxConfig(api_keys=(SANDBOX_KEY,)))
            servers.append(embedded_server(sandbox, host="127.0.0.1", port=sandbox_port))
        generated_key = None
        if "RELAY_API_KEYS" not in os.environ:
            generated_key = "dev-" + secrets.token_urlsafe(18)
            overrides["RELAY_API_KEYS"] = generated_key
        if "RELAY_WEBHOOK_SECRETS" not in os.environ:
            overrides["RELAY_WEBHOOK_SECRETS"] = (
                "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
            )
        if "RELAY_CALLBACK_ALLOWED_NETWORKS" not in os.environ:
            # The inbox lives on loopback, which production refuses.
            overrides["RELAY_CALLBACK_ALLOWED_NETWORKS"] = "127.0.0.0/8,::1/128"
        if "RELAY_CALLBACK_ALLOWED_PORTS" not in os.environ:
            overrides["RELAY_CALLBACK_ALLOWED_PORTS"] = f"80,443,8080,8443,{inbox_port}"
        overrides["RELAY_API_PORT"] = port
        overrides.setdefault("RELAY_LOG_FORMAT", "text")
        settings = load_settings(**overrides).require("api").require("worker")

        inbox = f"http://127.0.0.1:{inbox_port}/inbox"
        servers.append(embedded_server(create_app(settings), host="127.0.0.1", port=port))
        servers.append(
            embedded_server(
                create_inbox_app(settings.webhook_secrets), host="127.0.0.1", port=inbox_port
            )
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        tasks = [asyncio.create_task(server.serve()) for server in servers]
        worker = asyncio.create_task(serve_worker(settings, stop, http_port=None))
        failed = False
        while not all(server.started for server in servers):
            if any(task.done() for task in tasks):
                # uvicorn has logged why (typically a port in use); stop the rest cleanly.
                failed = True
                stop.set()
                break
            await asyncio.sleep(0.05)
        else:
            print(
                _banner(settings, port, inbox, sandboxed, own_redis, generated_key),
                flush=True,
            )
        await stop.wait()
        await worker
        for server in servers:
            server.should_exit = True
        await asyncio.gather(*tasks, return_exceptions=True)
        if failed:
            raise SystemExit(
                f"relay dev: could not listen on ports {port}-{inbox_port} (see above); "
                "try another --port"
            )
