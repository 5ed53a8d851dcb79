"""The job engine's queue side: scheduling, Dramatiq actors and the worker process."""
