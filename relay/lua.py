"""Redis scripts: `.lua` files beside the module that runs them, registered once per client.

Every script starts with relay/clock.lua, which defines `now` from Redis `TIME`: all decisions
about a job's fate use that one clock. Scripts name their keys and arguments in locals at the
top (`local job_key = KEYS[1]`), so a reader never counts positions.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from redis.asyncio import Redis
from redis.commands.core import AsyncScript


@cache
def source(package: str, name: str) -> str:
    """The text Redis runs for `package`'s `name`.lua: the clock preamble, then the script."""
    clock = resources.files("relay").joinpath("clock.lua").read_text()
    return clock + resources.files(package).joinpath(f"{name}.lua").read_text()


def register(redis: Redis, package: str, name: str) -> AsyncScript:
    return redis.register_script(source(package, name))
