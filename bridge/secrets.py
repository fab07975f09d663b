"""`racktwin init-secrets`: files the stack derives from compose/.env before anything else starts.

Writes the nginx htpasswd of the Ditto users (APR1-MD5, which nginx verifies itself, so the hash does
not depend on the C library of the nginx image) into the shared racktwin-secrets directory, and hands
that directory to the bridge user, which later stores the InfluxDB tokens there (see bootstrap.py).
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from pathlib import Path
from typing import Mapping

log = logging.getLogger(__name__)

HTPASSWD_NAME = "nginx.htpasswd"
# nginx basic-auth user -> environment variable holding its password (compose/.env).
DITTO_USER_ENV = {"ditto": "DITTO_ADMIN_PASSWORD", "bridge": "DITTO_BRIDGE_PASSWORD", "grafana": "DITTO_GRAFANA_PASSWORD"}
# uid of the `racktwin` user in compose/bridge.Dockerfile (gid 0 so Grafana, gid 0, can read its token).
BRIDGE_UID = 10001
BRIDGE_GID = 0

_ITOA64 = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_APR1_MAGIC = b"$apr1$"


class SecretsError(Exception):
    """A required secret is missing."""


def _to64(value: int, count: int) -> str:
    out = []
    for _ in range(count):
        out.append(_ITOA64[value & 0x3F])
        value >>= 6
    return "".join(out)


def apr1(password: str, salt: str) -> str:
    """Apache's APR1-MD5 crypt (`openssl passwd -apr1 -salt <salt>`); salt is up to 8 chars of [./0-9A-Za-z]."""
    pw = password.encode("utf-8")
    salt_b = salt.encode("ascii")[:8]
    ctx = pw + _APR1_MAGIC + salt_b
    alt = hashlib.md5(pw + salt_b + pw).digest()
    for remaining in range(len(pw), 0, -16):
        ctx += alt[: min(16, remaining)]
    bits = len(pw)
    while bits:
        ctx += b"\x00" if bits & 1 else pw[:1]
        bits >>= 1
    final = hashlib.md5(ctx).digest()
    for i in range(1000):
        step = pw if i & 1 else final
        if i % 3:
            step += salt_b
        if i % 7:
            step += pw
        step += final if i & 1 else pw
        final = hashlib.md5(step).digest()
    f = final
    encoded = (
        _to64((f[0] << 16) | (f[6] << 8) | f[12], 4)
        + _to64((f[1] << 16) | (f[7] << 8) | f[13], 4)
        + _to64((f[2] << 16) | (f[8] << 8) | f[14], 4)
        + _to64((f[3] << 16) | (f[9] << 8) | f[15], 4)
        + _to64((f[4] << 16) | (f[10] << 8) | f[5], 4)
        + _to64(f[11], 2)
    )
    return f"$apr1${salt_b.decode('ascii')}${encoded}"


def random_salt() -> str:
    return "".join(secrets.choice(_ITOA64) for _ in range(8))


def htpasswd_text(users: Mapping[str, str]) -> str:
    """htpasswd lines `user:$apr1$...` for each user (fresh salt each time)."""
    lines = []
    for user, password in users.items():
        if ":" in user or not user:
            raise SecretsError(f"invalid basic-auth user name {user!r}")
        lines.append(f"{user}:{apr1(password, random_salt())}")
    return "\n".join(lines) + "\n"


def ditto_users_from_env(env: Mapping[str, str]) -> dict[str, str]:
    missing = [var for var in DITTO_USER_ENV.values() if not env.get(var)]
    if missing:
        raise SecretsError(f"empty: {', '.join(missing)} (make up generates them in compose/.env)")
    return {user: env[var] for user, var in DITTO_USER_ENV.items()}


def write_file_atomic(path: Path, text: str, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, text.encode("utf-8"))
        os.fchmod(fd, mode)  # the umask must not narrow it
    finally:
        os.close(fd)
    os.replace(tmp, path)


def init_secrets(directory: Path, env: Mapping[str, str]) -> Path:
    """Write <directory>/nginx.htpasswd; as root, also give the directory to the bridge user."""
    directory.mkdir(parents=True, exist_ok=True)
    users = ditto_users_from_env(env)
    target = directory / HTPASSWD_NAME
    # 0644: nginx's workers (uid 101) read it; it holds salted hashes only.
    write_file_atomic(target, htpasswd_text(users), 0o644)
    if os.geteuid() == 0:
        os.chown(directory, BRIDGE_UID, BRIDGE_GID)
        os.chmod(directory, 0o755)
    log.info("wrote %s for users %s", target, ", ".join(users))
    return target
