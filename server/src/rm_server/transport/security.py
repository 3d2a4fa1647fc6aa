"""The bearer token both transports check: where it is read from, and how a presented one is compared.

The token is compared in constant time (hmac.compare_digest), so response timing does not leak how much of
a guess was right. Each transport decides which of its routes stay open (health checks: probes rarely
carry tokens).
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from rm_contract.config_cli import ConfigError

TOKEN_ENV = "RM_AUTH_TOKEN"


def read_token(token_file: str | None) -> str | None:
    """The bearer token from --auth-token-file, else the RM_AUTH_TOKEN environment variable, else None."""
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as e:
            raise ConfigError(f"--auth-token-file: cannot read {token_file}: {e.strerror}") from None
        if not token:
            raise ConfigError(f"--auth-token-file {token_file} is empty")
        return token
    return os.environ.get(TOKEN_ENV, "").strip() or None  # a trailing newline would lock every client out


def token_matches(presented: str | None, token: str) -> bool:
    """`presented` is `Bearer <token>`. Any text compares, a byte that is not UTF-8 included (aiohttp hands
    such header bytes over as surrogate escapes): it is a mismatch, never an error."""
    given = (presented or "").encode("utf-8", "surrogateescape")
    return hmac.compare_digest(given, f"Bearer {token}".encode())
