"""The Redis plumbing every stage stands on, and the one way to Redis.

Clients come from `conn` (one per process, every call bounded by RELAY_REDIS_TIMEOUT), key names
from `keys`, Redis's clock from `clock`. Writes that must hold together are scripts (`scripts`,
each a `.lua` file named after the module that runs it); the calls a process makes in one
event-loop turn share one held connection (`batch`). `watch` notices a Redis that lost its data,
`leased` spaces one worker's periodic work for all, `shared_state` and `stats` are the figures
every process reads.
"""
