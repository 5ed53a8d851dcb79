"""The HTTP server under the app: the one package that leans on aiohttp's internals.

connections.py: the connection protocol (header deadlines, the connection cap, enveloped
errors for malformed HTTP) and the runner every API process serves with; hot_path.py: the
plain cached reads taken off aiohttp's connection loop (api.hot_read answers them);
limits.py: the bounds, from the open-file limit and the settings.
"""

from api.server.connections import EnvelopeHandler, EnvelopeServer, make_runner
from api.server.limits import FD_RESERVE, connection_cap, raise_file_limit

__all__ = [
    "FD_RESERVE",
    "EnvelopeHandler",
    "EnvelopeServer",
    "connection_cap",
    "make_runner",
    "raise_file_limit",
]
