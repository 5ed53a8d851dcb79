"""schemathesis hooks for tests/fuzz_api.py (loaded through SCHEMATHESIS_HOOKS).

With FUZZ_OWN_USER set (the user-token run), about half of the generated `{userId}` path
values become the token's own user, so the user run reaches the routes' success paths as
well as their 403s.
"""

from __future__ import annotations

import os
import re
from typing import Any

import schemathesis

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


@schemathesis.hook
def map_path_parameters(ctx: Any, path_parameters: dict[str, Any] | None) -> Any:
    """Point half of the valid `{userId}` values at the token's own user."""
    own = os.environ.get("FUZZ_OWN_USER")
    user = (path_parameters or {}).get("userId")
    if own and isinstance(user, str) and _UUID.fullmatch(user) and int(user[-1], 16) % 2 == 0:
        path_parameters = {**(path_parameters or {}), "userId": own}
    return path_parameters
