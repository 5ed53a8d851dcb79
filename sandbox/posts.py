"""Deterministic sandbox timelines, assembled from pre-encoded post templates.

A new user's body is built without generating or encoding a post: a pool of POOL_SIZE template
posts is generated once (same generator as ever, fixed seed) and encoded as JSON fragments. A
user's digest (blake2b of the id, so the same in every process) picks a walk through the pool
(an odd stride from a start), a sequence of post times and a bluesky DID; the per-post fields
(id, userId, the DID of synced posts, createdAt, updatedAt) are spliced in around the
fragments and the whole body is one b"".join. Post ids are uuid-4 strings from the user's
digest XOR a fixed per-position mask, so they are unique within and, with overwhelming
probability, across users, and a shorter limit's posts are a prefix of a longer one's.
"""

from __future__ import annotations

import binascii
import hashlib
import random
import time
import uuid
from bisect import bisect_left
from functools import cache
from typing import Any

import msgspec

from engine.wire import Post, timeline_page_decoder

MAX_LIMIT = 1000
POOL_SIZE = 1024  # a power of two: every odd stride walks the whole pool
_STRIDES = 64  # walks a user can take through the pool
_CLOCKS = 8  # independent sequences of post times
_OFFSETS = 16  # how many slots of its clock a user's newest post may skip
_ID_BYTES = 18  # hexlified: one 36-character id record before the dashes go in

# Timestamps count back from a fixed instant so that a user's timeline never changes.
_ANCHOR_MS = 1_795_000_000_000
_MEDIA_HOST = "https://cdn.sandbox.local"
_LINK_HOST = "https://example.com"
_BASE32 = "234567abcdefghijklmnopqrstuvwxyz"
_CONTENT_TYPES = ("text", "image", "video", "link")
_CONTENT_WEIGHTS = (60, 20, 8, 12)
_VISIBILITIES = ("public", "followers", "private")
_VISIBILITY_WEIGHTS = (80, 15, 5)
# fmt: off
_TAGS = (
    "running", "coffee", "travel", "music", "photography", "cooking", "books", "cycling",
    "design", "python", "hiking", "film", "gardening", "startups", "art", "weekend",
)
# fmt: on
_SENTENCES = (
    "Morning run done. 10k in the rain.",
    "Finally finished the book everyone kept recommending.",
    "New pour-over recipe: 15 g of coffee, 250 g of water, patience.",
    "The light over the harbour tonight was unreal.",
    "Deleted more lines than I wrote today.",
    "First tomatoes of the season from the garden!",
    "Two hours on the bike, one flat tyre, zero regrets.",
    "Any quiet cafe downtown to work from? Asking for me.",
    "This bass line deserves an award.",
    "Bags packed, tickets checked twice, still sure I forgot something.",
    "Cooked for eight tonight and nobody asked for the recipe.",
    "Could have stayed in that photography exhibition for hours.",
    "Rainy Sunday: soup, an old film, phone on silent.",
    "Shipping something small today beats planning something perfect forever.",
    "Up on the ridge before sunrise, watching the valley fill with light.",
    "Sketching again after years away from it.",
    "Milestone hit a week early, so tomorrow is cake day.",
    "Found a record shop I walked past for years without noticing.",
    "Baking bread is mostly learning to wait.",
    "Late train home, great sunset though.",
    "Three weeks of cello lessons; the neighbours are very patient.",
    "First strawberries at the market, bought far too many.",
    "The new ramen place lives up to the hype.",
    "A quiet week of reading and walking.",
    "Grateful for friends who show up with coffee on moving day.",
    "Planted sunflowers along the fence, check back in August.",
    "The hallway conversations were the best part of the conference.",
    "Every desk clean-up turns up a pen I thought I had lost.",
    "The bug that haunted us all week was one missing character.",
    "Eleven dogs on the walk through the park, all very good.",
    "Trying to read more and scroll less this month.",
    "Swim before work: cold, quiet and exactly what I needed.",
    "Homemade pizza night, the dough finally behaved.",
    "Just booked the trip. No turning back now.",
    "Tiny balcony, big basil plant.",
    "Rewatching the whole series and noticing all the foreshadowing.",
    "Fixed the bike myself, only one part left over.",
    "Sunday market haul: bread, cheese, too many flowers.",
    "Learning to say no to meetings without an agenda.",
    "That first coffee after a long night hits different.",
)

# The encoded template is {"id":"","userId":"",<middle>"createdAt":"","updatedAt":""}; a
# synced template carries _DID_MARK where the user's DID goes.
_TEMPLATE_HEAD = b'{"id":"","userId":"",'
_TEMPLATE_TAIL = b'"createdAt":"","updatedAt":""}'
_DID_MARK = "did:plc:@"
_NEXT_POST = b',{"id":"'
_TO_BASE32 = bytes(ord(_BASE32[byte & 31]) for byte in range(256))
_TO_VARIANT = bytes(ord("89ab"[byte & 3]) for byte in range(256))  # hex digit -> 8, 9, a, b

_encoder = msgspec.json.Encoder()


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


def _table(values: tuple[str, ...], weights: tuple[int, ...]) -> tuple[str, ...]:
    # A weighted choice as one index into a 100-slot table (weights sum to 100).
    pairs = zip(values, weights, strict=True)
    return tuple(value for value, weight in pairs for _ in range(weight))


_CONTENT_TYPE_TABLE = _table(_CONTENT_TYPES, _CONTENT_WEIGHTS)
_VISIBILITY_TABLE = _table(_VISIBILITIES, _VISIBILITY_WEIGHTS)


def _base32(bits: int, length: int) -> str:
    return "".join(_BASE32[(bits >> (5 * n)) & 31] for n in range(length))


def _distinct(rng: random.Random, pool: tuple[str, ...], count: int) -> list[str]:
    """`count` (0 to 2) distinct members of `pool`."""
    if count == 0:
        return []
    first = int(rng.random() * len(pool))
    if count == 1:
        return [pool[first]]
    return [pool[first], pool[(first + 1 + int(rng.random() * (len(pool) - 1))) % len(pool)]]


def _media(rng: random.Random, content_type: str, name: str) -> list[Any]:
    if content_type == "image":
        return [
            {
                "type": "image",
                "url": f"{_MEDIA_HOST}/{name}{n}.jpg",
                "width": 1080,
                "height": (1080, 1350, 720)[int(rng.random() * 3)],
            }
            for n in range(1 if rng.random() < 0.8 else 2)
        ]
    if content_type == "video":
        return [
            {
                "type": "video",
                "url": f"{_MEDIA_HOST}/{name}.mp4",
                "thumbnailUrl": f"{_MEDIA_HOST}/{name}.jpg",
                "durationMs": 3_000 + int(rng.random() * 177_000),
            }
        ]
    return []


def _template(rng: random.Random) -> tuple[bytes, ...]:
    """One post's encoded middle (content to deleted), split where the user's DID goes."""
    rand = rng.random
    name = str(uuid.UUID(int=rng.getrandbits(128), version=4))[:13]  # names its media files
    content_type = _CONTENT_TYPE_TABLE[int(rand() * 100)]
    content = " ".join(_distinct(rng, _SENTENCES, 1 if rand() < 0.85 else 2))
    if content_type == "link":
        content += f" {_LINK_HOST}/{name[:8]}"
    synced = rand() < 0.15
    rkey = _base32(rng.getrandbits(65), 13) if synced else None
    post = Post(
        id="",
        userId="",
        content=content,
        contentType=content_type,
        media=msgspec.Raw(_encoder.encode(_media(rng, content_type, name))),
        visibility=_VISIBILITY_TABLE[int(rand() * 100)],
        likeCount=int(rng.expovariate(1 / 40)),
        commentCount=int(rng.expovariate(1 / 6)),
        repostCount=int(rng.expovariate(1 / 3)),
        metadata=msgspec.Raw(_encoder.encode({"tags": _distinct(rng, _TAGS, int(rand() * 3))})),
        blueskyUri=f"at://{_DID_MARK}/app.bsky.feed.post/{rkey}" if synced else None,
        blueskyDid=_DID_MARK if synced else None,
        blueskyRkey=rkey,
        syncedToBluesky=synced,
        deleted=False,
        createdAt="",
        updatedAt="",
    )
    encoded = _encoder.encode(post)
    if not (encoded.startswith(_TEMPLATE_HEAD) and encoded.endswith(_TEMPLATE_TAIL)):
        raise RuntimeError(f"unexpected post encoding: {encoded[:80]!r}")
    middle = encoded[len(_TEMPLATE_HEAD) : -len(_TEMPLATE_TAIL)]
    return tuple(middle.split(_DID_MARK.encode()))


class _Walk:
    """The pool in one stride's order, twice over, so a window is one list slice."""

    __slots__ = ("middles", "parts", "synced")

    def __init__(self, templates: list[tuple[bytes, ...]], stride: int) -> None:
        order = [(i * stride) % POOL_SIZE for i in range(POOL_SIZE)] * 2
        self.middles = [templates[t][0] for t in order]
        # Positions of the synced templates (sorted), and their parts to join with a DID.
        self.synced = [at for at, t in enumerate(order) if len(templates[t]) > 1]
        self.parts = [templates[order[at]] for at in self.synced]

    def window(self, start: int, count: int, did: bytes) -> list[bytes]:
        """The middles of `count` posts from `start`, with this DID in the synced ones."""
        middles, synced, parts = self.middles, self.synced, self.parts
        if start + count > len(middles):  # past two laps of the pool: only from generate_posts
            laps = (start + count) // POOL_SIZE + 1
            middles = middles[:POOL_SIZE] * laps
            lap = synced[: bisect_left(synced, POOL_SIZE)]
            synced = [at + n * POOL_SIZE for n in range(laps) for at in lap]
            parts = parts[: len(lap)] * laps
        window = middles[start : start + count]
        first, last = bisect_left(synced, start), bisect_left(synced, start + count)
        for at, pieces in zip(synced[first:last], parts[first:last], strict=True):
            window[at - start] = did.join(pieces)
        return window


class _Clock:
    """A fixed sequence of post times, newest first, encoded as post tails; grown on demand."""

    def __init__(self, seed: str) -> None:
        self._rng = random.Random(seed)  # a str seed is hashed with sha512: stable across runs
        self._created = _ANCHOR_MS - int(self._rng.random() * 86_400_000)
        self.tails: list[bytes] = []

    def upto(self, size: int) -> list[bytes]:
        rand = self._rng.random
        while len(self.tails) < size:
            created = self._created
            updated = created + 60_000 + int(rand() * 7_140_000) if rand() < 0.1 else created
            tail = f'"createdAt":"{_iso(created)}","updatedAt":"{_iso(updated)}"}}'
            self.tails.append(tail.encode() + _NEXT_POST)
            self._created -= 60_000 + int(rand() * 129_540_000)
        return self.tails


class _Pool:
    def __init__(self) -> None:
        rng = random.Random("sandbox-post-templates")
        templates = [_template(rng) for _ in range(POOL_SIZE)]
        strides = rng.sample(range(1, POOL_SIZE, 2), _STRIDES)
        self.walks = [_Walk(templates, stride) for stride in strides]
        self.clocks = [_Clock(f"sandbox-post-clock-{n}") for n in range(_CLOCKS)]
        self.masks = b""

    def mask(self, count: int) -> int:
        """The fixed per-position id mask for `count` posts (a prefix of any longer one)."""
        size = _ID_BYTES * count
        if len(self.masks) < size:
            stream = hashlib.shake_128(b"sandbox-post-ids")
            self.masks = stream.digest(max(size, _ID_BYTES * (MAX_LIMIT + 1)))
        return int.from_bytes(self.masks[:size], "big")


@cache
def _pool() -> _Pool:
    return _Pool()


def _post_ids(key: bytes, count: int, mask: int) -> list[bytes]:
    """`count` uuid-4 strings: the user's key XOR the position masks, hexlified, dashed."""
    mixed = (int.from_bytes(key * count, "big") ^ mask).to_bytes(_ID_BYTES * count, "big")
    text = bytearray(binascii.hexlify(mixed))
    dashes = b"-" * count
    text[8::36] = text[13::36] = text[18::36] = text[23::36] = dashes
    text[14::36] = b"4" * count
    text[19::36] = text[19::36].translate(_TO_VARIANT)
    ids = bytes(text)
    return [ids[at : at + 36] for at in range(0, 36 * count, 36)]


def timeline_body(user_id: str, limit: int) -> bytes:
    """The encoded 200 answer for this user and limit."""
    user = msgspec.json.encode(user_id)
    more = b"true" if limit < MAX_LIMIT else b"false"
    end = b'],"pagination":{"page":1,"limit":%d,"hasMore":%s}}' % (limit, more)
    head = b'{"success":true,"userId":' + user + b',"posts":['
    if limit <= 0:
        return head + end
    pool = _pool()
    digest = hashlib.blake2b(user_id.encode("utf-8", "surrogatepass"), person=b"sandbox").digest()
    did = b"did:plc:" + digest[:24].translate(_TO_BASE32)
    walk = pool.walks[digest[24] % _STRIDES]
    start = int.from_bytes(digest[25:27], "big") % POOL_SIZE
    offset = digest[27] % _OFFSETS
    tails = pool.clocks[digest[28] % _CLOCKS].upto(offset + limit)[offset : offset + limit]
    tails[-1] = tails[-1][: -len(_NEXT_POST)]
    pieces = [b""] * (4 * limit + 2)
    pieces[0] = head + b'{"id":"'
    pieces[1:-1:4] = _post_ids(digest[32 : 32 + _ID_BYTES], limit, pool.mask(limit))
    pieces[2:-1:4] = [b'","userId":' + user + b","] * limit
    pieces[3:-1:4] = walk.window(start, limit, did)
    pieces[4:-1:4] = tails
    pieces[-1] = end
    return b"".join(pieces)


def generate_posts(user_id: str, count: int) -> list[Post]:
    """The newest `count` posts of this user; a shorter list is a prefix of a longer one."""
    return timeline_page_decoder.decode(timeline_body(user_id, count)).posts
