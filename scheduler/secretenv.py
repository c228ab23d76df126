"""Jobs' secret environment variables: sealed with Fernet at rest, opened only for the TaskSpec.

A job's `secret_env` is stored as `{name: Fernet token of the value}`
(`jobs.secret_env_ciphertext`): the names stay readable, so the API can show them as "***"
without any key, and each value is encrypted and authenticated on its own. The keys come from
`FAIRGPU_SECRET_KEYS` (comma-separated): the first encrypts, every one decrypts (`MultiFernet`),
so a key is rotated by putting the new one first and dropping the old one once nothing it sealed
is still needed (`rotate` re-seals with the first key).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import TYPE_CHECKING

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

if TYPE_CHECKING:
    from scheduler.settings import Settings

MASK = "***"
KEYS_SETTING = "FAIRGPU_SECRET_KEYS"
HOW_TO_CONFIGURE = (
    f"set {KEYS_SETTING} on the server to a key printed by `fairgpu admin gen-secret-key`"
)


class SecretsUnreadable(Exception):
    """A sealed value that none of the configured keys opens (its key was dropped)."""


def generate_key() -> str:
    return Fernet.generate_key().decode("ascii")


def split_keys(keys: str) -> list[str]:
    return [key.strip() for key in keys.split(",") if key.strip()]


def check_keys(keys: str) -> None:
    """Raise ValueError naming the position (never the text) of a key Fernet refuses."""
    parsed = split_keys(keys)
    if not parsed:
        raise ValueError(f"{KEYS_SETTING} is set but holds no key")
    for position, key in enumerate(parsed, start=1):
        try:
            Fernet(key)
        except (ValueError, TypeError):
            raise ValueError(
                f"{KEYS_SETTING}: key {position} is not a Fernet key "
                "(32 url-safe base64-encoded bytes; `fairgpu admin gen-secret-key` prints one)"
            ) from None


@lru_cache(maxsize=4)
def cipher(keys: str) -> MultiFernet:
    """The cipher of a comma-separated key list (checked by Settings), built once per list."""
    return MultiFernet([Fernet(key) for key in split_keys(keys)])


def settings_cipher(settings: Settings) -> MultiFernet | None:
    """The server's cipher; None when no key is configured."""
    if settings.secret_keys is None:
        return None
    return cipher(settings.secret_keys.get_secret_value())


def seal(box: MultiFernet, values: Mapping[str, str]) -> dict[str, str]:
    return {
        name: box.encrypt(value.encode("utf-8")).decode("ascii") for name, value in values.items()
    }


def unseal(box: MultiFernet | None, sealed: Mapping[str, str]) -> dict[str, str]:
    if not sealed:
        return {}
    if box is None:
        raise SecretsUnreadable(
            f"the job's secret_env cannot be decrypted: the server has no {KEYS_SETTING}"
        )
    try:
        return {
            name: box.decrypt(token.encode("ascii")).decode("utf-8")
            for name, token in sealed.items()
        }
    except (InvalidToken, UnicodeError):
        raise SecretsUnreadable(
            "the job's secret_env cannot be decrypted with any key in "
            f"{KEYS_SETTING} (was its key dropped?)"
        ) from None


def rotate(box: MultiFernet, sealed: Mapping[str, str]) -> dict[str, str]:
    """The same values sealed with the first key; raises SecretsUnreadable like `unseal`."""
    try:
        return {
            name: box.rotate(token.encode("ascii")).decode("ascii")
            for name, token in sealed.items()
        }
    except InvalidToken:
        raise SecretsUnreadable(
            f"a secret_env value cannot be decrypted with any key in {KEYS_SETTING}"
        ) from None


def masked(sealed: Mapping[str, str] | None) -> dict[str, str]:
    """What the API shows of a job's secret_env: its names, every value "***"."""
    return dict.fromkeys(sealed or {}, MASK)
