"""Secrets never leave the process in text: audit rows, alerts and logs pass through ``redact``."""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import unquote, urlsplit

MASK = "***"
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s'\"]+:)(?P<pw>[^@\s'\"]+)(?P<at>@)")
_PEM = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----", re.S)
_JSON_KEY = re.compile(r"(?P<head>[\"']?private_key[\"']?\s*[:=]\s*[\"'])(?P<val>[^\"']+)")
_extra: set[str] = set()


def register_secret(value: str | None) -> None:
    """Add a value (a token, a password from a saved block) to what ``redact`` masks in this process."""
    if value and len(value) >= 4:
        _extra.add(value)


def url_password(url: str | None) -> str | None:
    """The password inside a connection URI, if any."""
    if not url:
        return None
    try:
        pw = urlsplit(url).password
    except ValueError:
        return None
    return unquote(pw) if pw else None


def known_secrets() -> list[str]:
    """Every secret this process knows of: the settings' (read from the environment now) and registered ones."""
    from bq_refresh.settings import load_settings

    values = set(_extra)
    try:
        s = load_settings()
    except Exception:  # noqa: BLE001 - redaction must never fail because the environment is invalid
        return sorted(values, key=len, reverse=True)
    for secret in (s.webhook_secret, s.api_token, s.google_credentials_json):
        if secret is not None and secret.get_secret_value():
            values.add(secret.get_secret_value())
    for url in (s.webhook_url or "").split(","):
        parts = urlsplit(url.strip())
        if parts.path not in ("", "/") and len(parts.path) >= 16:  # e.g. Slack's /services/T../B../secret
            values.add(parts.path)
        if parts.password:
            values.add(unquote(parts.password))
    if s.database_url is not None:
        url = s.database_url.get_secret_value()
        values.add(url)
        pw = url_password(url)
        if pw:
            values.add(pw)
    if s.google_credentials_json is not None:
        try:
            import json

            info = json.loads(s.google_credentials_json.get_secret_value())
            for k in ("private_key", "private_key_id", "client_secret", "refresh_token"):
                if isinstance(info.get(k), str):
                    values.add(info[k])
        except ValueError:
            pass
    return sorted((v for v in values if len(v) >= 4), key=len, reverse=True)


def redact(text: str, secrets: Iterable[str] | None = None) -> str:
    """Mask passwords in URIs, PEM private keys, JSON private_key fields and every known secret value."""
    if not text:
        return text
    for value in (known_secrets() if secrets is None else secrets):
        if value in text:
            text = text.replace(value, MASK)
    text = _PEM.sub(MASK, text)
    text = _JSON_KEY.sub(lambda m: m.group("head") + MASK, text)
    return _URL_PASSWORD.sub(lambda m: m.group("head") + MASK + m.group("at"), text)
