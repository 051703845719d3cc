"""Hide credentials in URLs before they are printed, logged or stored.

Works on free text (exception messages quote URLs) as well as on a bare URL, so it
is a pattern match rather than a URL parser; SQLAlchemy's own rendering is not
enough either: it shows query-string passwords and the tail of a password that
holds an unencoded ``@``.
"""

from __future__ import annotations

import re

__all__ = ["redact"]

MASK = "***"

# scheme://user:password@host -- the password runs to the *last* "@" of the authority
# (which ends at "/", "?", "#", whitespace or a quote), so "u:p@ss@host" hides "p@ss".
_USERINFO = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:/?#@\s'\"<>]*):(?P<pw>[^/?#\s'\"<>]*)@")
# ?password=..., &token=..., #access_token=...: any query parameter whose name speaks of
# a secret; in running text (libpq's "host=h password=p") only the plain names, so that
# ordinary settings such as "keys=3" stay readable
_QUERY_KEY = r"[\w.\-]*(?:pass|pwd|secret|token|key|sig|credential|auth)[\w.\-]*"
_WORD_KEY = r"(?:password|passwd|pwd|secret|token|api[_\-]?key|access[_\-]?token)"
_VALUE = r"(?P<value>[^&;#\s'\"<>]+)"
_QUERY = re.compile(rf"(?:(?<=[?&;#])(?P<key>{_QUERY_KEY}=)|(?<![^\s])(?P<word>{_WORD_KEY}=)){_VALUE}",
                    re.IGNORECASE)

def redact(text: str | None) -> str:
    """``postgresql://user:secret@host/db?token=t`` -> ``postgresql://user:***@host/db?token=***``."""
    if not text:
        return text or ""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    return _QUERY.sub(lambda m: f"{m['key'] or m['word']}{MASK}", text)
