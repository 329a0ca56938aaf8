"""What resolving a request's key to its caller costs, per request, by the number of keys.

Run: uv run python bench/caller_auth.py [--repeat 20000]

Times relay.api.auth.authenticate (the auth middleware's whole check: read the header, one
SHA-256, a constant-time compare against every key of every caller) in this process, for books
of 1, 20, 200 and 2,000 keys, with the matching key last (every key is compared either way).
Issue #20's target: authorization adds at most 5 % to submit CPU (bench/forward.py: ~510-550 µs
of API CPU per submission), so at most ~25 µs.
"""

from __future__ import annotations

import argparse
import time

from relay.api.auth import authenticate
from relay.callers.model import CallerBook, read_callers


def book_of(keys: int) -> tuple[CallerBook, str]:
    callers = [
        {"name": f"team-{n}", "keys": [f"bench-key-{n:06d}-0123456789"]} for n in range(keys)
    ]
    return read_callers({"callers": callers}), f"bench-key-{keys - 1:06d}-0123456789"


def per_call(book: CallerBook, headers: dict[bytes, bytes], repeat: int) -> float:
    started = time.process_time()
    for _ in range(repeat):
        authenticate(book, headers)
    return (time.process_time() - started) / repeat * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=20000)
    args = parser.parse_args()
    for keys in (1, 20, 200, 2000):
        book, key = book_of(keys)
        repeat = max(200, args.repeat // max(1, keys // 20))
        found = [per_call(book, {b"x-api-key": key.encode()}, repeat) for _ in range(5)]
        wrong = per_call(book, {b"x-api-key": b"not-a-key-0123456789"}, repeat)
        print(
            f"{keys:5d} keys: {sorted(found)[2]:7.2f} µs per accepted request (median of 5), "
            f"{wrong:7.2f} µs per refused one"
        )


if __name__ == "__main__":
    main()
