"""What the router changes in a request on its way to vLLM: the headers it forwards and the `model` field of the
body (a stable name becomes the versioned name it points at; everything else stays byte for byte)."""

from __future__ import annotations

import json
import re
from email import message_from_bytes
from email.message import Message
from typing import NamedTuple
from urllib.parse import parse_qsl, urlencode

# Per connection, never forwarded (RFC 9110 7.6.1); host and content-length are recomputed for the next hop.
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
              "host", "content-length"}
# What h11 (httpx's HTTP/1.1 layer) accepts; anything else raises LocalProtocolError mid-request, i.e. a 500.
_FIELD_NAME = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_FIELD_VALUE = re.compile(rb"(?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?")


def bearer_token(value: str | None) -> str | None:
    """The token of `Bearer <token>`, None for an absent, empty or other-scheme header (vLLM's parsing)."""
    scheme, _, token = (value or "").strip().partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


def forward_headers(raw: list[tuple[bytes, bytes]], keep_auth: bool) -> list[tuple[bytes, bytes]]:
    """Raw (byte-exact) headers minus hop-by-hop ones, those `Connection` names, and any that h11 would refuse;
    `Authorization` only when `keep_auth` (lm-eval sends `Bearer ` with no key set: forwarding it is a 500)."""
    named = {t.strip().lower() for k, v in raw if k.lower() == b"connection" for t in v.decode("latin-1").split(",")}
    drop = HOP_BY_HOP | named | (set() if keep_auth else {"authorization"})
    return [(name, value) for name, value in raw if name.decode("latin-1").lower() not in drop
            and _FIELD_NAME.fullmatch(name) and _FIELD_VALUE.fullmatch(value)]


class Rewritten(NamedTuple):
    body: bytes
    model: str | None  # the model name vLLM will see, None when the body names none
    missing: bool  # a well-formed body without a `model` field (malformed ones get vLLM's own 400)


def rewrite_model(body: bytes, content_type: str, routes: dict[str, str]) -> Rewritten:
    """The body with a stable `model` replaced by its versioned name. Bodies that name no stable model are
    returned byte for byte."""
    if not body:
        return Rewritten(body, None, False)
    parsed = Message()
    parsed["content-type"] = content_type or "application/json"
    kind = parsed.get_content_type()
    if kind == "multipart/form-data" and isinstance(boundary := parsed.get_param("boundary"), str):
        return _rewrite_multipart(body, boundary.encode("latin-1"), routes)
    if kind == "application/x-www-form-urlencoded":
        fields = parse_qsl(body.decode("utf-8", errors="replace"), keep_blank_values=True)
        model = next((v for k, v in fields if k == "model"), None)
        if model not in routes:
            return Rewritten(body, model, not model)
        return Rewritten(urlencode([(k, routes[v] if k == "model" else v) for k, v in fields]).encode(),
                         routes[model], False)
    if kind == "application/json" or kind.endswith("+json"):
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return Rewritten(body, None, False)  # vLLM answers malformed JSON with its own 400
        if not isinstance(payload, dict) or not isinstance(model := payload.get("model"), str):
            return Rewritten(body, None, isinstance(payload, dict) and payload.get("model") is None)
        if model not in routes:
            return Rewritten(body, model, not model)
        payload["model"] = routes[model]
        return Rewritten(json.dumps(payload, ensure_ascii=False).encode(), routes[model], False)
    return Rewritten(body, None, False)


def _rewrite_multipart(body: bytes, boundary: bytes, routes: dict[str, str]) -> Rewritten:
    """Replace the value of the `model` form field in place; file parts stay byte for byte (audio uploads)."""
    parts = body.split(b"--" + boundary)
    for index, part in enumerate(parts[1:-1], start=1):
        head, sep, value = part.partition(b"\r\n\r\n")
        headers = message_from_bytes(head.removeprefix(b"\r\n"))
        if not sep or headers.get_param("name", header="content-disposition") != "model" \
                or headers.get_param("filename", header="content-disposition") is not None:
            continue
        model = value.removesuffix(b"\r\n").decode("utf-8", errors="replace")
        if model not in routes:
            return Rewritten(body, model, not model)
        parts[index] = head + sep + routes[model].encode() + b"\r\n"
        return Rewritten((b"--" + boundary).join(parts), routes[model], False)
    return Rewritten(body, None, True)
