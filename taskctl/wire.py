"""Bytes in JSON: how a command, its arguments, its environment's values and its working
directory travel, since to the kernel they are bytes, not text.

In Python such a value is a `str` whose undecodable bytes are lone surrogates (U+DC80-U+DCFF),
as `sys.argv`, `os.environ` and `os.getcwd()` give them (PEP 383, "surrogateescape"), and as
`os.posix_spawn` turns back into the same bytes. On the wire it is a JSON string when it is
valid UTF-8 (nearly always), else an object `{"base64": "..."}` of its exact bytes. Nothing else
on the wire may carry such bytes: names, labels, queues and keys are UTF-8 text.

Standard library only: the CLI imports it on its fast path.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any


def is_text(value: str) -> bool:
    """Whether the string is valid Unicode with no escaped bytes (it encodes as UTF-8)."""
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def to_wire(value: str) -> str | dict[str, str]:
    """A bytes-carrying string as it goes into JSON."""
    if is_text(value):
        return value
    raw = value.encode("utf-8", "surrogateescape")
    return {"base64": base64.b64encode(raw).decode()}


def from_wire(value: object) -> str:
    """The string a wire value stands for; ValueError if it is neither form."""
    if isinstance(value, str):
        value.encode("utf-8", "surrogateescape")  # a surrogate that stands for no byte fails
        return value
    if isinstance(value, dict) and set(value) == {"base64"} and isinstance(value["base64"], str):
        try:
            raw = base64.b64decode(value["base64"], validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("base64 value is not valid base64") from None
        return raw.decode("utf-8", "surrogateescape")
    raise ValueError('expected a string, or {"base64": "..."} for bytes that are not UTF-8')


def dumps_request(body: Any) -> bytes:
    """A request body as JSON, every string that carries bytes in its wire form. Costs one
    extra walk only when some string does (json.dumps escapes lone surrogates as \\udcXX)."""
    text = json.dumps(body, separators=(",", ":"))
    if "\\udc" in text:
        text = json.dumps(_wired(body), separators=(",", ":"))
    return text.encode()


def _wired(value: Any) -> Any:
    if isinstance(value, str):
        return to_wire(value)
    if isinstance(value, list):
        return [_wired(v) for v in value]
    if isinstance(value, dict):
        return {k: _wired(v) for k, v in value.items()}
    return value


def shown(value: object) -> str:
    """A wire value as a person reads it: bytes that are not UTF-8 as \\xNN."""
    try:
        text = from_wire(value)
    except ValueError:
        return repr(value)
    if is_text(text):
        return text
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
