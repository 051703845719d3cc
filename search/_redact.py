"""Hide credentials in URLs before they are printed, logged or stored."""

from __future__ import annotations

import re

__all__ = ["redact"]

_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]*)@")


def redact(text: str | None) -> str:
    """``postgresql://user:secret@host/db`` -> ``postgresql://user:***@host/db``."""
    if not text:
        return text or ""
    return _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)
