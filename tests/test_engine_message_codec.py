"""Dramatiq's messages through orjson (engine/broker/message_codec.py): the bytes Dramatiq's own
JSON encoder writes, read both ways, installed in every process that imports the engine's
broker package."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import dramatiq
import pytest
from dramatiq.errors import DecodeError

from engine.broker import dramatiq_layout as layout
from engine.broker.jobs import job_kwargs, job_message
from engine.broker.message_codec import MessageCodec
from tests.engine_support import user

STDLIB = dramatiq.JSONEncoder()
CODEC = MessageCodec()


def built(delay_ms: int = 0, *, batch: bool = False) -> bytes:
    """A prefetch message as the engine writes it: ids, timestamp, options, an eta if delayed."""
    uid = user()
    args: tuple[Any, ...] = ([uid, user()], "batch-1") if batch else (uid, f"prefetch:{uid}:1")
    message = job_message("high", args, job_kwargs("schedule", False), batch=batch)
    message.options["traceparent"] = {"traceparent": "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"}
    outgoing = layout.encode(layout.encoder_broker(), message, delay_ms)
    return outgoing.data


def test_the_engine_encodes_with_the_codec() -> None:
    assert isinstance(dramatiq.get_encoder(), MessageCodec)


@pytest.mark.parametrize(("delay_ms", "batch"), [(0, False), (5_000, False), (0, True)])
def test_the_codec_writes_what_dramatiqs_json_encoder_writes(delay_ms: int, batch: bool) -> None:
    data = built(delay_ms, batch=batch)
    decoded = STDLIB.decode(data)
    assert STDLIB.encode(decoded) == data  # what Dramatiq's encoder would have written
    assert CODEC.decode(data) == decoded
    if delay_ms:
        assert decoded["options"]["eta"] > 0  # the delayed form was compared too


def test_either_encoders_messages_decode_alike() -> None:
    data = {"args": ["Zoë", "\u65e5\u672c", "\U0001f600"], "kwargs": {"n": 1, "x": None}}
    by_stdlib, by_codec = STDLIB.encode(data), CODEC.encode(data)
    assert by_stdlib != by_codec  # escapes against UTF-8: different bytes ...
    for encoded in (by_stdlib, by_codec):  # ... the same message, whichever reads it
        assert CODEC.decode(encoded) == STDLIB.decode(encoded) == data


def test_an_integer_beyond_64_bits_falls_back_to_the_stdlib() -> None:
    data = {"args": [2**70]}
    assert CODEC.encode(data) == STDLIB.encode(data)
    assert CODEC.decode(CODEC.encode(data)) == data


@pytest.mark.parametrize("data", [b"{not json", b"\xff\xfe", b"[1, 2]", b"null"])
def test_what_is_not_a_message_fails_as_dramatiq_says(data: bytes) -> None:
    with pytest.raises(DecodeError):
        CODEC.decode(data)
    with pytest.raises(DecodeError):
        dramatiq.Message.decode(data)


def test_a_process_that_imports_the_broker_package_has_the_codec() -> None:
    code = "import dramatiq, engine.broker.jobs; print(type(dramatiq.get_encoder()).__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "MessageCodec"
