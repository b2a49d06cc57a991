"""Encryption at rest: where the key comes from, and the cipher for one message's content.

A key is 32 random bytes written in URL-safe base64 (44 characters, what
`fusion keygen` prints). It comes from ``FUSION_ENCRYPTION_KEY``, else from a
key file (``FUSION_ENCRYPTION_KEY_FILE``, or ``encryption_key_file`` in the
config file) that only its owner may read (like an SSH private key: any
group or other permission bit is refused). The key itself is never a flag or
a config key, so it stays out of shell history and of config files that get
copied around.

An encrypted content is one ASCII token::

    fusion:enc:v1:<key id>:<base64url(nonce || ciphertext || tag)>

AES-256-GCM with a fresh random 96-bit nonce per message, rather than
Fernet: GCM takes associated data, so the message's role (which stays plain)
is bound to its content and a token moved to another role fails to decrypt;
Fernet's tokens would carry each message's write time in clear, and are
larger. The key id (8 hex digits of an HMAC of the key) tells "encrypted with
another key" apart from "altered", so errors can say which it is.

Only this module and storage/encrypted.py know the format. `cryptography` is
imported on the first encryption or decryption, never when no key is set; so
are base64 and hashlib, since every command without a key still loads
`is_token` (a read must refuse ciphertext).
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from pathlib import Path

from .errors import MissingDriver, UsageError

PREFIX = "fusion:enc:v1:"
KEY_ENV = "FUSION_ENCRYPTION_KEY"
KEY_FILE_ENV = "FUSION_ENCRYPTION_KEY_FILE"
INSTALL_HINT = "pip install 'fusion_cli[encryption]'"
KEY_BYTES = 32
_NONCE_BYTES = 12
# Nonce (12) + tag (16) are at least 28 bytes: 38 base64 characters, unpadded.
_TOKEN_RE = re.compile(r"fusion:enc:v1:([0-9a-f]{8}):([A-Za-z0-9_-]{38,})")
_KEY_FORMAT = f"{KEY_BYTES} bytes in URL-safe base64 (44 characters), as 'fusion keygen' prints"


class TokenError(Exception):
    """A token this cipher cannot open; `kind` is ``other-key`` or ``damaged``."""

    def __init__(self, kind: str, key_id: str | None = None) -> None:
        super().__init__(kind)
        self.kind = kind
        self.key_id = key_id


def is_token(content: str) -> bool:
    """Whether a stored content is an encrypted token (only a whole, well-formed one counts)."""
    return content.startswith(PREFIX) and _TOKEN_RE.fullmatch(content) is not None


def token_key_id(content: str) -> str | None:
    m = _TOKEN_RE.fullmatch(content) if content.startswith(PREFIX) else None
    return m.group(1) if m else None


def new_key() -> str:
    """A fresh key from the operating system's CSPRNG (needs no `cryptography`)."""
    import base64

    return base64.urlsafe_b64encode(os.urandom(KEY_BYTES)).decode("ascii")


def key_id(key: bytes) -> str:
    import hashlib
    import hmac

    return hmac.new(key, b"fusion key id v1", hashlib.sha256).hexdigest()[:8]


def parse_key(text: str, source: str) -> bytes:
    """The 32 key bytes of `text`; UsageError naming `source`, never showing the value."""
    import base64
    import binascii

    value = text.strip()
    try:
        raw = base64.b64decode(value.encode("ascii"), altchars=b"-_", validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raw = b""
    if len(raw) != KEY_BYTES:
        raise UsageError(f"{source} does not hold a valid encryption key: expected {_KEY_FORMAT}",
                         hint="make one with 'fusion keygen'")
    return raw


def read_key_file(path: str | os.PathLike[str]) -> bytes:
    """The key in `path`, which must be readable by its owner only."""
    from pathlib import Path

    target = Path(path).expanduser()
    try:
        fd = os.open(target, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise UsageError(f"encryption key file {target} does not exist",
                         hint=f"make one with 'fusion keygen -o {target}'") from None
    except OSError as exc:
        raise UsageError(f"cannot read encryption key file {target}: {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if os.name == "posix" and mode & 0o077:
            raise UsageError(f"encryption key file {target} can be used by other users "
                             f"(mode {mode & 0o777:04o}); refusing it", hint=f"chmod 600 {target}")
        data = os.read(fd, 4096)
    finally:
        os.close(fd)
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        text = ""
    return parse_key(text, f"encryption key file {target}")


def configured_cipher(key_file: str | None = None, env: Mapping[str, str] | None = None) -> "Cipher | None":
    """The cipher of the configured key, or None when none is configured.

    ``FUSION_ENCRYPTION_KEY`` wins over a key file named in the config file
    (`key_file`, after the usual env > config precedence); setting both
    environment variables is refused as ambiguous.
    """
    env = os.environ if env is None else env
    value = env.get(KEY_ENV) or None
    if value is not None and env.get(KEY_FILE_ENV):
        raise UsageError(f"both {KEY_ENV} and {KEY_FILE_ENV} are set", hint="unset one of them")
    if value is not None:
        return Cipher(parse_key(value, KEY_ENV))
    if key_file:
        return Cipher(read_key_file(key_file))
    return None


def _b64(data: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _aad(role: str) -> bytes:
    return PREFIX.encode() + role.encode("utf-8")


class Cipher:
    """AES-256-GCM over one message's content, bound to its role."""

    def __init__(self, key: bytes | str) -> None:
        if isinstance(key, str):
            key = parse_key(key, "the key")
        if len(key) != KEY_BYTES:
            raise UsageError(f"an encryption key must be {KEY_BYTES} bytes, not {len(key)}")
        self._key = key
        self.key_id = key_id(key)
        self._aead: Any = None

    def __repr__(self) -> str:  # never the key itself, even in a traceback
        return f"<Cipher key id {self.key_id}>"

    def _gcm(self) -> Any:
        if self._aead is None:
            try:
                from cryptography.hazmat.primitives.ciphers.aead import AESGCM
            except ImportError as exc:
                raise MissingDriver("encryption at rest needs the Python package 'cryptography', "
                                    "which is not installed", hint=INSTALL_HINT) from exc
            self._aead = AESGCM(self._key)
        return self._aead

    def encrypt(self, role: str, content: str) -> str:
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._gcm().encrypt(nonce, content.encode("utf-8"), _aad(role))
        return f"{PREFIX}{self.key_id}:{_b64(nonce + sealed)}"

    def decrypt(self, role: str, token: str) -> str:
        """The plaintext of `token`; TokenError when it is another key's or was altered."""
        m = _TOKEN_RE.fullmatch(token)
        if m is None:
            raise TokenError("damaged")
        if m.group(1) != self.key_id:
            raise TokenError("other-key", m.group(1))
        gcm = self._gcm()
        from cryptography.exceptions import InvalidTag

        try:
            data = _unb64(m.group(2))
            return gcm.decrypt(data[:_NONCE_BYTES], data[_NONCE_BYTES:], _aad(role)).decode("utf-8")
        except (InvalidTag, ValueError):  # binascii.Error and UnicodeDecodeError are ValueErrors
            raise TokenError("damaged", m.group(1)) from None


def write_key_file(path: str | os.PathLike[str], key: str) -> Path:
    """Write `key` to a new file, mode 0600 from the start; an existing file is never replaced."""
    from pathlib import Path

    target = Path(path).expanduser()
    try:
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    except FileExistsError:
        raise UsageError(f"{target} already exists; it was not replaced",
                         hint="a replaced key can no longer decrypt what it encrypted; choose another file") from None
    except OSError as exc:
        raise UsageError(f"cannot create key file {target}: {exc.strerror}") from None
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(key + "\n")
        f.flush()
        os.fsync(f.fileno())
    return target
