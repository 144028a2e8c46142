"""API keys of the search service: where a key comes from, how it is stored, and how a request's key is checked.

The model is the one of Ray's own dashboard token (``RAY_AUTH_MODE=token``, ``~/.ray/auth_token``): a random key
made on first use into a file only its owner can read, or given by an environment variable (a Kubernetes secret
mounted as ``DENSEQA_API_KEY``); clients send it as ``Authorization: Bearer <key>`` (RFC 6750).

The key itself never enters a Serve config, a log line or ``/info``: the ingress is told only the SHA-256 digests
of the keys it accepts (a Serve config is logged by the controller and shown by the dashboard, and the digest of a
256-bit random key reveals nothing usable). A request's key is hashed and compared to each accepted digest with
:func:`hmac.compare_digest`, so the comparison takes the same time whatever the key. Several digests may be
accepted at once: that is how a key is rotated without downtime (the new and the old key during the change).

Written here rather than taken from a library: FastAPI's ``HTTPBearer`` parses the header but leaves the check, the
key's storage and rotation to the application.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

from denseqa.errors import InputError

KEY_ENV = "DENSEQA_API_KEY"
DEFAULT_KEY_FILE = "~/.denseqa/api_key"
MIN_KEY_CHARS = 16  # a key shorter than this is refused: it could be guessed through the open port


def digest(key: str) -> str:
    """The SHA-256 of a key, hex: what a Serve config carries instead of the key."""
    return hashlib.sha256(key.encode()).hexdigest()


def _checked(key: str, source: str) -> str:
    key = key.strip()
    if len(key) < MIN_KEY_CHARS:
        raise InputError(f"{source}: an API key needs at least {MIN_KEY_CHARS} characters, got {len(key)}")
    if any(c.isspace() for c in key):
        raise InputError(f"{source}: an API key may not contain whitespace")
    if not (key.isascii() and key.isprintable()):
        # An HTTP header is read as latin-1 and the key hashed as UTF-8: any other character could never match.
        raise InputError(f"{source}: an API key must be printable ASCII (a header cannot carry other characters "
                         "as they are)")
    return key


def new_key() -> str:
    """A random key: 32 bytes from the OS's CSPRNG, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(32)


def write_key(path: str | Path, key: str) -> Path:
    """Write ``key`` to ``path`` atomically, readable by its owner only (0600, in a folder of mode 0700 if new)."""
    path = Path(path).expanduser()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    staged = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    # Created 0600 from the start (O_EXCL: never reusing a file someone else made), then renamed over the old one,
    # so the key is never readable by others and never half-written.
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
        os.replace(staged, path)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    return path


def read_key_file(path: str | Path) -> str | None:
    """The key in ``path``; None if there is no such file. Refused, as ssh refuses a private key, if others may
    read it, if it is not this user's, or if its folder may be written by others (who could put their own key
    file there, and have the service accept their key)."""
    path = Path(path).expanduser()
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise InputError(f"{path}: the API key file cannot be read ({e.strerror or e})") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise InputError(f"{path}: the API key file may be read by others (mode {stat.S_IMODE(info.st_mode):o}); "
                         f"run `chmod 600 {path}`")
    if hasattr(os, "getuid") and info.st_uid not in (os.getuid(), 0):
        raise InputError(f"{path}: the API key file belongs to another user (uid {info.st_uid})")
    for folder in {path.absolute().parent, path.resolve().parent}:  # the link's folder, and its target's
        folder_mode = folder.stat().st_mode
        if folder_mode & (stat.S_IWGRP | stat.S_IWOTH) and not folder_mode & stat.S_ISVTX:
            raise InputError(f"{path}: its folder {folder} may be written by others (mode "
                             f"{stat.S_IMODE(folder_mode):o}), who could replace the key; keep it in a folder of "
                             "yours")
    try:
        return _checked(path.read_text(), str(path))
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: the API key file cannot be read ({getattr(e, 'strerror', None) or e})") from None


def resolve_key(key_file: str | Path = DEFAULT_KEY_FILE, create: bool = True) -> tuple[str, str]:
    """The service's API key and where it came from: ``$DENSEQA_API_KEY`` if set, else the key file, else a new
    key written to the key file (when ``create``). The source is what to tell a user; the key is never logged."""
    from_env = os.environ.get(KEY_ENV)
    if from_env:
        return _checked(from_env, f"${KEY_ENV}"), f"${KEY_ENV}"
    path = Path(key_file).expanduser()
    key = read_key_file(path)
    if key is None:
        if not create:
            raise InputError(f"{path}: no API key file (and ${KEY_ENV} is not set); deploy with `denseqa serve` "
                             "to create one")
        key = new_key()
        write_key(path, key)
    return key, str(path)


def bearer_header(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def curl_header(key_source: str | None) -> str:
    """A curl ``-H`` option that passes the key by reference (its file or variable), never by value: a command
    line lands in shell histories and logs. Empty without a key (``--no-auth``)."""
    if key_source is None:
        return ""
    value = key_source if key_source.startswith("$") else f"$(cat {key_source})"
    return f' -H "Authorization: Bearer {value}"'


class KeyCheck:
    """The keys one ingress replica accepts, as digests; ``open`` lets every request through (``--no-auth``)."""

    def __init__(self, digests: list[str], open: bool = False) -> None:
        self.digests = [d.lower() for d in digests]
        self.open = open

    def allows(self, authorization: str | None) -> bool:
        """Whether an ``Authorization`` header value carries an accepted key; in constant time for any key."""
        if self.open:
            return True
        scheme, _, key = (authorization or "").partition(" ")
        presented = digest(key.strip()).encode()
        ok = False
        for accepted in self.digests:  # every digest is compared, so the time does not say which one matched
            ok |= hmac.compare_digest(presented, accepted.encode())
        return ok and scheme.lower() == "bearer"


# The check of the ingress replica in this process (one per process: a Serve replica is an actor of its own). Kept
# here, behind functions, because Serve ships the ingress class and its FastAPI app to the replica by value
# (cloudpickle): module state of the file that defines them would be copied, while an imported module like this
# one is the same object for the replica's code and the app's middleware.
_installed: KeyCheck | None = None


def install(check: KeyCheck) -> None:
    global _installed
    _installed = check


def installed() -> KeyCheck | None:
    """This process's check; None until an ingress replica installed one (then no request gets through)."""
    return _installed
