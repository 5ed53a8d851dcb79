"""Simulated upstreams for `prefetch sandbox` and `prefetch dev`: a timeline service and a CA.

Both run on loopback over real HTTP (docs/contract.md §8). Fixed tokens and fault users are
named in `sandbox.ca` and `sandbox.timeline`; the knobs are `SANDBOX_LATENCY_MS`,
`SANDBOX_JITTER_MS` and `SANDBOX_ERROR_RATE`.
"""

from sandbox.ca import SandboxTokens, ca_app, user_token
from sandbox.config import SandboxSettings, load_sandbox_settings
from sandbox.server import SandboxServer, run_sandbox
from sandbox.timeline import generate_posts, timeline_app, timeline_body

__all__ = [
    "SandboxServer",
    "SandboxSettings",
    "SandboxTokens",
    "ca_app",
    "generate_posts",
    "load_sandbox_settings",
    "run_sandbox",
    "timeline_app",
    "timeline_body",
    "user_token",
]
