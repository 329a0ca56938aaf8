"""Redis scripts: `.lua` files beside the module that runs them, registered once per client.

A script is named after its module: `schedule.claim.lua` beside `schedule.py` (or `stranded.lua`
for a module's one script), registered there with `register(redis, __name__, "claim")`.

Every script starts with scripts.clock.lua, which defines `now` from Redis `TIME`: all decisions
about a job's fate use that one clock. Scripts name their keys and arguments in locals at the
top (`local job_key = KEYS[1]`), so a reader never counts positions.

A script call joins the other Redis calls made in the same event-loop turn in one round trip
(relay.redis.batch); given a pipeline (`client=`), it is queued there instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.commands.core import AsyncScript

from relay.redis.batch import Arg, ScriptCall, batcher


@cache
def source(module: str, name: str | None = None, prelude: str = "") -> str:
    """The text Redis runs for `module`'s script `name` (`module.name.lua` beside it, or
    `module.lua` without a name): the clock preamble, `prelude` (functions a stage shares
    between its scripts, such as relay.jobs.history's), then the script."""
    package, _, owner = module.rpartition(".")
    clock = resources.files(__package__).joinpath("scripts.clock.lua").read_text()
    filename = f"{owner}.{name}.lua" if name else f"{owner}.lua"
    return clock + prelude + resources.files(package).joinpath(filename).read_text()


class Script:
    def __init__(self, redis: Redis, text: str) -> None:
        self.redis = redis
        self.script: AsyncScript = redis.register_script(text)

    async def __call__(
        self,
        keys: Sequence[str | bytes] = (),
        args: Sequence[Arg] = (),
        client: Pipeline | None = None,
    ) -> Any:
        if client is not None:
            return await self.script(keys=keys, args=args, client=client)
        return await batcher(self.redis).script(self.script, keys, args)

    def call(self, keys: Sequence[str | bytes] = (), args: Sequence[Arg] = ()) -> ScriptCall:
        """This script's call, not yet made: for one `batcher(...).run` with others."""
        return ScriptCall(self.script, keys, args)


def register(redis: Redis, module: str, name: str | None = None, *, prelude: str = "") -> Script:
    """The script `name` of `module` (pass `__name__`), registered on this client, after
    `prelude` (Lua text that defines shared functions)."""
    return Script(redis, source(module, name, prelude))
