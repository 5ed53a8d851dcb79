"""The HTTP API of exprsn-prefetch (SPEC.md section 4): cached reads, prefetch control, health."""

from api.app import create_app

__all__ = ["create_app"]
