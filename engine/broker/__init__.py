"""The job engine's queue side: scheduling, Dramatiq actors and the worker process."""

from engine.broker import message_codec

message_codec.install()  # every process that touches Dramatiq's messages imports this package
