"""Passwords in mosquitto's password-file format, made in Python (no ``mosquitto_passwd``).

mosquitto 2.0 reads ``user:$7$<iterations>$<base64 salt>$<base64 hash>``: PBKDF2-HMAC-SHA512
over the password with a 12-byte salt, a 64-byte key, 101 iterations by default (what
``mosquitto_passwd`` 2.0.11 writes). The controller keeps only this hash: the password itself is
handed once to the agent in its join answer.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from edgefed.common.errors import ConfigError

ITERATIONS = 101
"""mosquitto_passwd 2.0's default; mosquitto accepts any count written in the hash."""
_SALT_BYTES = 12
_KEY_BYTES = 64


def new_password() -> str:
    """A random password: 32 URL-safe characters (192 bits)."""
    return secrets.token_urlsafe(24)


def hash_password(password: str, *, iterations: int = ITERATIONS, salt: bytes | None = None) -> str:
    """The ``$7$`` hash of ``password`` as mosquitto's password file holds it."""
    if not password:
        raise ConfigError("an MQTT password must not be empty")
    if iterations < 1:
        raise ConfigError(f"PBKDF2 iterations must be positive, not {iterations}")
    salt = salt if salt is not None else secrets.token_bytes(_SALT_BYTES)
    key = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, _KEY_BYTES)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(key).decode()}"


def verify_password(password: str, hashed: str) -> bool:
    """Whether ``password`` matches a ``$7$`` hash (as mosquitto would decide)."""
    parts = hashed.split("$")
    if len(parts) != 5 or parts[0] or parts[1] != "7" or not parts[2].isdigit():
        raise ConfigError("not a mosquitto $7$ password hash")
    salt = base64.b64decode(parts[3])
    expected = base64.b64decode(parts[4])
    key = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, int(parts[2]), len(expected))
    return hmac.compare_digest(key, expected)
