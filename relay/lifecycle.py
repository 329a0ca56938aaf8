"""One lifecycle for every long-running part of a process, and the one supervisor that runs them.

A `Service` works in `run(stop)` until `stop` is set, then returns once it starts nothing new.
Its `drain(deadline)` comes after: work it started that is still in flight may finish until
`deadline` (event-loop time), and what is left is handed back for another process to finish.
`supervise` starts every service in one TaskGroup and stops them in an order given as data:
step by step, each step's services told to stop together and drained before the next step's.

The periodic loops (Redis's clock, the Redis watch, the leased sweeps, the sweeper) share
`repeat`: every interval until stopped, a failed turn logged rather than ending the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from redis.exceptions import RedisError

log = logging.getLogger(__name__)

# How long a step's stopping services may take to return at the least, whatever is left of the
# drain timeout (RELAY_SHUTDOWN_TIMEOUT may be 0): a sweep finishing its page, a loop waking up.
MIN_STOP_WAIT = 1.0
# How often a drain looks again at what is in flight (new work may still be starting).
DRAIN_STEP = 0.2
# How often a task that is to end is cancelled again while it runs on (see cancel_and_wait).
CANCEL_AGAIN = 0.1


class Service:
    """A long-running part of a process, stopped by the supervisor."""

    name = "service"

    async def run(self, stop: asyncio.Event) -> None:
        """Work until `stop` is set; then return once nothing new is being started."""
        raise NotImplementedError

    async def drain(self, deadline: float) -> None:
        """Let work in flight finish until `deadline` (loop time), then hand back the rest.
        Nothing of a service without this outlives its `run`."""


async def sleep_until_stopped(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep `seconds`, or less when `stop` is set meanwhile; True when stopped."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=max(seconds, 0.0))
    return stop.is_set()


async def repeat(
    turn: Callable[[], Awaitable[float | None]],
    *,
    every: float,
    stop: asyncio.Event,
    what: str,
    first_after: float = 0.0,
) -> None:
    """Run `turn` every `every` seconds (or after as many as a turn returns) until `stop`.

    A turn that meets a Redis error is skipped with a warning, and any other error is logged
    with its traceback: a bug or an outage in one turn must not end the process's loop.
    """
    if await sleep_until_stopped(stop, first_after):
        return
    while True:
        wait = every
        try:
            asked = await turn()
            if asked is not None:
                wait = asked
        except RedisError as exc:
            log.warning("%s skipped: %s", what, type(exc).__name__)
        except Exception:
            log.exception("%s failed", what)
        if await sleep_until_stopped(stop, wait):
            return


async def wait_for_tasks(
    in_flight: Callable[[], Iterable[asyncio.Task[Any]]], deadline: float
) -> None:
    """Wait until no task of `in_flight()` is running, or `deadline` (loop time) passes.

    The tasks are asked for again and again: work may still start while a drain waits (arq
    half-way through starting a batch of jobs), after any one snapshot would be taken.
    """
    loop = asyncio.get_running_loop()
    while (left := deadline - loop.time()) > 0:
        running = [task for task in in_flight() if not task.done()]
        if not running:
            return
        await asyncio.wait(running, timeout=min(left, DRAIN_STEP))


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel `task` and wait until it has ended, cancelling it again while it runs on; raises
    what it failed with, if anything but the cancel.

    One cancel is not always enough: on Python 3.11, `asyncio.wait_for` (redis-py writes every
    command through it when the client has a socket timeout, so arq's loop is often inside one)
    swallows a cancel that arrives just as the call it waits on completes, and the task carries
    on as if never cancelled. One cancel followed by an unbounded wait then never returns.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait((task,), timeout=CANCEL_AGAIN)
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def supervise(
    services: Sequence[Service],
    order: Sequence[Sequence[str]],
    stop: asyncio.Event,
    *,
    drain_timeout: float,
) -> None:
    """Run `services` until `stop`, then stop them step by step in `order` (service names, each
    named once; names of services a process runs without are passed over): each step's runs are
    stopped together, then drained until `drain_timeout` after `stop`.

    A service whose run fails is logged and counts as stopped: the others carry on (a worker's
    liveness check notices a dead poll loop), and shutdown still drains and hands back.
    """
    by_name = {service.name: service for service in services}
    named = [name for step in order for name in step]
    if len(by_name) != len(services) or any(named.count(name) != 1 for name in by_name):
        raise ValueError(f"the shutdown order {named} must name each of {sorted(by_name)} once")
    # A process runs without some services (a worker with sweeps off): their steps are skipped.
    steps = [present for step in order if (present := [n for n in step if n in by_name])]
    stops = {name: asyncio.Event() for name in by_name}
    loop = asyncio.get_running_loop()
    async with asyncio.TaskGroup() as group:
        runs = {
            name: group.create_task(_run(service, stops[name]), name=name)
            for name, service in by_name.items()
        }
        await stop.wait()
        deadline = loop.time() + drain_timeout
        for step in steps:
            log.info("stopping %s", ", ".join(step))
            for name in step:
                stops[name].set()
            step_runs = [runs[name] for name in step]
            # Within the drain timeout, and never less than MIN_STOP_WAIT for a step: a later
            # step still stops cleanly when an earlier one used up the timeout.
            _, late = await asyncio.wait(
                step_runs, timeout=max(deadline - loop.time(), MIN_STOP_WAIT)
            )
            for task in late:
                # Stuck past its bound (a sweep in a page that never answers): cut off. What
                # it held, a lease or a claim, expires by itself.
                log.warning("%s did not stop in time and was cancelled", task.get_name())
            await asyncio.gather(*(cancel_and_wait(task) for task in late))
            drained = await asyncio.gather(
                *(by_name[name].drain(deadline) for name in step), return_exceptions=True
            )
            for name, outcome in zip(step, drained, strict=True):
                if isinstance(outcome, Exception):
                    # What it could not hand back is recovered by its lease or guard expiring.
                    log.error("%s could not drain", name, exc_info=outcome)
                elif isinstance(outcome, BaseException):
                    raise outcome


async def _run(service: Service, stop: asyncio.Event) -> None:
    try:
        await service.run(stop)
    except Exception:
        log.exception("%s stopped with an error", service.name)
