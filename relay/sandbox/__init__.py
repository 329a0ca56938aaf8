"""A stand-in for Chamelaion's lip-sync API, for `relay dev`, `relay sandbox` and the tests.

Development tooling: it is left out of the wheel (and so the image), and imports nothing from
the rest of the relay.
"""

from relay.sandbox.app import create_sandbox_app
from relay.sandbox.state import SandboxConfig

__all__ = ["SandboxConfig", "create_sandbox_app"]
