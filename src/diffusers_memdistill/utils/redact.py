"""Secrets kept out of everything the project writes: saved configs, recorded command lines, tracker configs."""

from __future__ import annotations

import re

_SECRET_KEY = re.compile(r"token|secret|password|api_key", re.IGNORECASE)
_REDACTED = "<redacted>"


def redact_config(config):
    """A copy of a training config with the values of secret keys (``hub_token``...) and flags replaced."""
    if isinstance(config, dict):
        return {k: (_REDACTED if _SECRET_KEY.search(str(k)) and v not in (None, "", False) else redact_config(v))
                for k, v in config.items()}
    if isinstance(config, list):
        return _redact_argv([redact_config(v) for v in config])
    return config


def _redact_argv(argv: list) -> list:
    out, hide_next = [], False
    for item in argv:
        if hide_next:
            out.append(_REDACTED)
            hide_next = False
            continue
        if isinstance(item, str) and item.startswith("--") and _SECRET_KEY.search(item):
            if "=" in item:
                item = item.split("=", 1)[0] + "=" + _REDACTED
            else:
                hide_next = True
        out.append(item)
    return out
