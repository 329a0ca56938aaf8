"""httpx URLs parsed once per address.

httpx parses a URL in Python, at ~20 µs each, and every upstream call and callback builds an
`httpx.Request` from a string. An `httpx.URL` is immutable, so one parsed for an address serves
every request to it: the submit path, status reads of the same job and callbacks to the same
receiver stop paying for it.
"""

from __future__ import annotations

import functools

import httpx


@functools.lru_cache(maxsize=1024)
def parsed_url(text: str) -> httpx.URL:
    return httpx.URL(text)
