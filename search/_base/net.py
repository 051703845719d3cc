"""Whether a tracking server answers: one TCP connect, bounded, before any MLflow call
(an MLflow call to a server that is down retries for minutes)."""

from __future__ import annotations

import socket

__all__ = ["server_address", "server_reachable"]


def server_address(uri: str) -> tuple[str, int] | None:
    """(host, port) of an http(s) tracking server; None for a local store."""
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    try:
        port = parts.port
    except ValueError:
        return None
    return parts.hostname, port or (443 if parts.scheme == "https" else 80)


def server_reachable(uri: str, timeout_s: float = 2.0) -> bool:
    """Whether a tracking server accepts connections (True for a local store).

    A plain TCP connect answers in at most ``timeout_s``; an MLflow call to a
    server that is down retries for minutes.
    """
    server = server_address(uri)
    if server is None:
        return True
    try:
        with socket.create_connection(server, timeout=timeout_s):
            return True
    except OSError:
        return False
