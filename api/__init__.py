"""The HTTP API of exprsn-prefetch (api/openapi.yaml): cached reads, prefetch control, health."""

from api.app import create_app

__all__ = ["create_app"]
