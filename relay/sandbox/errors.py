"""The sandbox's one exception: an HTTP error answered as Chamelaion would, `{"error": ...}`.

The sandbox is a stand-in for Chamelaion, so it shares no code with the relay it is tested
against (tests/test_layout.py enforces that): a bug in the relay must not hide in both.
"""

from __future__ import annotations


class SandboxError(Exception):
    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
