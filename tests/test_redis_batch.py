"""Coalesced round trips (relay.redis.batch) on a real Redis: many callers, one pipeline, and
each caller still gets exactly its own results and errors."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time

import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from relay.devtools.embedded_redis import find_redis_server
from relay.devtools.ports import free_port
from relay.redis import batch, scripts
from relay.redis.batch import MAX_BATCH, batcher
from tests.servers import REDIS_OPTIONS, own_redis

# Returns its argument, or fails when told to: one failing call among many.
ECHO = "if ARGV[1] == 'fail' then return redis.error_reply('told to fail') end return ARGV[1]"


async def connected_clients(redis: Redis) -> int:
    info = await redis.info("clients")
    return int(info["connected_clients"])


async def test_concurrent_calls_share_round_trips_and_connections(redis: Redis) -> None:
    script = scripts.Script(redis, ECHO)
    before = await connected_clients(redis)
    results = await asyncio.gather(*(script(keys=[], args=[str(n)]) for n in range(2000)))
    assert results == [str(n).encode() for n in range(2000)]
    # One at a time, 2,000 concurrent calls would each take a connection of the pool; in
    # batches of MAX_BATCH they need a handful.
    assert await connected_clients(redis) - before <= 2000 // MAX_BATCH + 2


async def test_each_caller_gets_its_own_result_or_error(redis: Redis) -> None:
    script = scripts.Script(redis, ECHO)
    b = batcher(redis)

    async def reads(n: int) -> list[object]:
        return await b.run([("SET", f"k{n}", n), ("GET", f"k{n}")])

    outcomes = await asyncio.gather(
        script(keys=[], args=["a"]),
        script(keys=[], args=["fail"]),
        reads(7),
        script(keys=[], args=["b"]),
        return_exceptions=True,
    )
    assert outcomes[0] == b"a"
    assert isinstance(outcomes[1], ResponseError)
    assert "told to fail" in str(outcomes[1])
    assert outcomes[2] == [True, b"7"]
    assert outcomes[3] == b"b"


async def test_calls_run_in_the_order_made(redis: Redis) -> None:
    b = batcher(redis)
    await asyncio.gather(*(b.run([("RPUSH", "order", n)]) for n in range(300)))
    assert await redis.lrange("order", 0, -1) == [str(n).encode() for n in range(300)]  # type: ignore[misc]


async def test_an_atomic_run_is_one_transaction_among_other_calls(redis: Redis) -> None:
    b = batcher(redis)
    await redis.set("text", "x")
    outcomes = await asyncio.gather(
        b.run([("SET", "before", 1)]),
        b.run([("HSET", "h", "f", "1"), ("EXPIRE", "h", 60), ("HGETALL", "h")], atomic=True),
        # Refused as queued (no such command): nothing of its run is done.
        b.run([("HSET", "never", "f", "1"), ("NOSUCHCOMMAND",)], atomic=True),
        # Fails as it runs: only that call, as in any transaction.
        b.run([("LPUSH", "text", "a"), ("SET", "after", 1)], atomic=True, return_exceptions=True),
        return_exceptions=True,
    )
    assert outcomes[0] == [True]
    assert outcomes[1] == [1, True, {b"f": b"1"}]
    assert isinstance(outcomes[2], ResponseError)
    assert not await redis.exists("never")
    wrong_type, after = outcomes[3]  # type: ignore[misc]
    assert isinstance(wrong_type, ResponseError) and after is True
    with pytest.raises(ValueError, match="plain commands"):
        await b.run([scripts.Script(redis, ECHO).call(keys=[], args=["a"])], atomic=True)


async def test_scripts_are_loaded_again_after_redis_forgets_them(redis: Redis) -> None:
    script = scripts.Script(redis, ECHO)
    assert await script(keys=[], args=["x"]) == b"x"
    await redis.script_flush()
    # A NOSCRIPT call never ran: it is run again once the script is loaded, and only once.
    b = batcher(redis)
    counted = scripts.Script(redis, "return redis.call('INCR', KEYS[1])")
    await redis.script_flush()
    results = await asyncio.gather(
        script(keys=[], args=["y"]), counted(keys=["runs"]), b.run([("INCR", "runs")])
    )
    assert results[0] == b"y"
    assert int(await redis.get("runs") or 0) == 2


async def test_a_cancelled_caller_does_not_disturb_the_others(redis: Redis) -> None:
    script = scripts.Script(redis, ECHO)
    first = asyncio.ensure_future(script(keys=[], args=["gone"]))
    second = asyncio.ensure_future(script(keys=[], args=["kept"]))
    await asyncio.sleep(0)
    first.cancel()
    assert await second == b"kept"
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_a_connection_error_reaches_every_caller_of_the_batch() -> None:
    # Nothing listens on port 1: the whole pipeline fails, and every caller hears it.
    client = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=1)
    script = scripts.Script(client, ECHO)
    outcomes = await asyncio.gather(
        *(script(keys=[], args=[str(n)]) for n in range(5)), return_exceptions=True
    )
    assert all(isinstance(outcome, Exception) for outcome in outcomes)
    await client.aclose()


def test_a_client_can_be_used_from_one_event_loop_after_another(redis_url: str) -> None:
    client = Redis.from_url(redis_url)
    script = scripts.Script(client, ECHO)

    async def once(value: str) -> object:
        result = await script(keys=[], args=[value])
        await client.connection_pool.disconnect()
        return result

    assert asyncio.run(once("first")) == b"first"
    assert asyncio.run(once("second")) == b"second"


async def test_a_stalled_redis_fails_calls_within_the_timeout_and_they_recover() -> None:
    with own_redis() as (redis_url, redis_proc):
        client = Redis.from_url(redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
        script = scripts.Script(client, ECHO)
        deadline = time.monotonic() + 10
        while True:  # the server may still be starting
            try:
                assert await script(keys=[], args=["up"]) == b"up"
                break
            except RedisError:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
        os.kill(redis_proc.pid, signal.SIGSTOP)
        try:
            for _ in range(2):  # the second one reconnects: its handshake is bounded too
                started = time.monotonic()
                first, queued = await asyncio.wait_for(
                    asyncio.gather(
                        script(keys=[], args=["a"]), delayed(script, "b"), return_exceptions=True
                    ),
                    timeout=5,
                )
                # The one on the line times out; the one queued behind it fails with it rather
                # than wait out a second timeout.
                assert isinstance(first, RedisError)
                assert queued is first
                assert time.monotonic() - started < 1.5
        finally:
            os.kill(redis_proc.pid, signal.SIGCONT)
        assert await script(keys=[], args=["back"]) == b"back"
        await client.aclose()


async def delayed(script: scripts.Script, value: str) -> object:
    await asyncio.sleep(0.1)  # made while the first call's round trip is on the line
    return await script(keys=[], args=[value])


async def test_a_held_connection_closed_by_redis_while_idle_is_replaced_before_use(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(batch, "IDLE_CHECK", 0.2)
    port = free_port()

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [find_redis_server(), *REDIS_OPTIONS, "--port", str(port)],
        )

    proc = start()
    client = Redis.from_url(f"redis://127.0.0.1:{port}/0", socket_timeout=2)
    script = scripts.Script(client, ECHO)
    try:
        await until_answered(script)
        proc.terminate()  # a restart while the line sits idle: its socket is dead
        proc.wait(timeout=10)
        proc = start()
        await asyncio.sleep(0.5)
        # Checked before use, as the pool checks what it hands out: no call fails for it.
        assert await until_answered(script) == 1
    finally:
        await client.aclose()
        proc.terminate()
        proc.wait(timeout=10)


async def until_answered(script: scripts.Script) -> int:
    """Call until Redis answers (it may still be starting); how many tries it took."""
    for tries in range(1, 200):
        try:
            await script(keys=[], args=["x"])
            return tries
        except RedisError as exc:
            if "Connection refused" not in str(exc) and "Error 111" not in str(exc):
                raise
            await asyncio.sleep(0.05)
    raise AssertionError("Redis never answered")
