"""The composition root: the `prefetch` command that starts the API, workers, sandbox and dev.

It sits above `engine/`, `api/` and `sandbox/`; nothing below imports it.
"""
