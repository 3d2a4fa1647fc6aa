"""Reading an HTTP route's JSON body: every failure a status and a reason, and no compressed bodies (a few
hundred KB of gzip unpack to tens of MB of JSON, decompressed and parsed on the event loop: a hostile
client stalled every caller for 9.6 s that way)."""

from __future__ import annotations

import json

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError


class BodyError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


async def json_body(request: web.Request) -> object:
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise BodyError(415, f"Content-Encoding {encoding[:40]!r} is not accepted: send the JSON body uncompressed")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise BodyError(413, "the body is over the size limit (--max-message-mb)") from None
    except RequestPayloadError as e:
        raise BodyError(400, f"the body could not be read ({e})") from None
    try:
        return json.loads(raw)
    except RecursionError:
        raise BodyError(400, "the body is JSON nested too deeply") from None
    except ValueError as e:  # not JSON, not UTF-8, an integer of thousands of digits
        raise BodyError(400, f"the body is not valid JSON ({str(e)[:200]})") from None
