"""Recognise credentials where the config must not hold them (they would be written to OUTPUT/config.toml, to
every teacher cache entry, and echoed in error messages). Keys come from environment variables only.

These are heuristics tuned to refuse what people actually paste (provider key prefixes, `Bearer ...`, JWTs,
long random tokens, `user:password@` in URLs, fields named like `api_key`) while letting ordinary values
through (`max_tokens`, `return_token_ids`, model names, short ids, sentences, URLs). None of the helpers
returns or formats the value it inspects, so callers can build messages that never echo a secret.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any
from urllib.parse import parse_qsl, urlsplit

# A field or header NAME that holds a credential: matched on the whole name or its last `_`-separated words,
# so `max_tokens` and `return_token_ids` pass while `api_key`, `hf_token` and `client_secret` do not.
_SECRET_NAME = re.compile(
    r"(^|_)(api_?key|apikey|access_?key|secret_?key|private_?key|token|access_?token|auth_?token|refresh_?token|"
    r"id_?token|secret|client_?secret|password|passwd|authorization|auth|cookie|credentials?)$"
)
# An authorization scheme followed by its credential: "Bearer sk-...", "Basic dXNlcjpw...".
_AUTH_SCHEME = re.compile(r"^\s*(bearer|basic|token|digest|apikey|api-key)\s+\S", re.IGNORECASE)
# Well-known key shapes: OpenAI/Anthropic/Stripe-style sk-/pk-/rk-, GitHub, GitLab, Slack, Hugging Face, AWS,
# Google API keys, and JWTs.
_KEY_PREFIX = re.compile(
    r"^(sk|pk|rk|sess)[-_][A-Za-z0-9_-]{8,}"
    r"|^(ghp|gho|ghu|ghs|ghr|github_pat|glpat|xox[abprs]|hf|key|api)[-_][A-Za-z0-9_-]{16,}"
    r"|^(AKIA|ASIA)[0-9A-Z]{12,}"
    r"|^AIza[0-9A-Za-z_-]{20,}"
    r"|^eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"
)
_TOKEN_CHARS = re.compile(r"^[A-Za-z0-9_\-.+=~]+$")
# Hex strings: keys are often 32+ hex digits, in either case. A 40-digit lower-case one is a git commit id (every
# tool prints them in lower case): a model revision or a snapshot directory, not a credential. Upper-case or
# mixed-case hex, and every other length (32-hex and 64-hex keys are common), stay refused.
_HEX = re.compile(r"^[0-9A-Fa-f]+$")
_HASH_HEX = re.compile(r"^[0-9a-f]{40}$")


def _entropy_bits_per_char(text: str) -> float:
    counts = Counter(text)
    return -sum(c / len(text) * math.log2(c / len(text)) for c in counts.values())


def _class_switch_rate(text: str) -> float:
    """How often consecutive letters/digits change class (lower, upper, digit): ~0.5 for random keys, far lower
    for names and dates ("gpt-4o-deployment-2024-08-06")."""
    kinds = ["d" if c.isdigit() else "l" if c.islower() else "u" for c in text if c.isalnum()]
    if len(kinds) < 2:
        return 0.0
    return sum(a != b for a, b in zip(kinds, kinds[1:], strict=False)) / (len(kinds) - 1)


def looks_like_credential(value: str) -> bool:
    """True for a string that looks like an API key, a bearer credential or a long random token."""
    text = value.strip()
    if _AUTH_SCHEME.match(text) or _KEY_PREFIX.match(text):
        return True
    if _HEX.match(text):  # decided by shape, not by the randomness tests below (they miss some random hex keys)
        return (
            len(text) >= 32
            and not _HASH_HEX.match(text)
            and any(c.isdigit() for c in text)
            and any(c.isalpha() for c in text)
        )
    # A long random token: 32+ characters, no spaces, letters and digits mixed as in a key, not words and dates.
    return (
        len(text) >= 32
        and bool(_TOKEN_CHARS.match(text))
        and any(c.isdigit() for c in text)
        and any(c.isalpha() for c in text)
        and _entropy_bits_per_char(text) >= 3.0
        and _class_switch_rate(text) >= 0.25
    )


def is_secret_name(name: str) -> bool:
    """True for a field/header/parameter name that conventionally holds a credential."""
    return bool(_SECRET_NAME.search(name.strip().lower().replace("-", "_")))


def find_secret(data: Any, path: str = "", *, check_names: bool = True, check_values: bool = True) -> str | None:
    """The dotted path of the first credential-like name or value inside `data` (dicts, lists, strings), or None.

    The path names only keys and indices, never the value, so it is safe to print.
    """
    if isinstance(data, dict):
        for key, value in data.items():
            where = f"{path}.{key}" if path else str(key)
            if check_names and isinstance(value, str) and value and is_secret_name(str(key)):
                return where
            found = find_secret(value, where, check_names=check_names, check_values=check_values)
            if found is not None:
                return found
    elif isinstance(data, (list, tuple)):
        for i, value in enumerate(data):
            found = find_secret(value, f"{path}[{i}]", check_names=check_names, check_values=check_values)
            if found is not None:
                return found
    elif isinstance(data, str) and check_values and looks_like_credential(data):
        return path or "(value)"
    return None


def url_secret_problem(url: str) -> str | None:
    """Why an endpoint URL carries a credential (user:password@, a key-like query parameter), or None."""
    try:
        parts = urlsplit(url)
        has_userinfo = parts.username is not None or parts.password is not None
    except ValueError:  # an unparsable port or bracket: let the URL validator report it without echoing
        return None
    if has_userinfo or "@" in parts.netloc:
        return "it holds credentials before the host (user:password@)"
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if is_secret_name(name) or name.lower() in ("key", "sig", "signature") or looks_like_credential(value):
            return "its query string holds a credential (a key-like parameter)"
    if any(looks_like_credential(segment) for segment in parts.path.split("/")):
        return "its path holds what looks like a key"
    return None


def contains_secret(value: Any) -> bool:
    """True when `value` (any config input: a string, a dict, a list) holds a credential-looking string or URL."""
    if isinstance(value, str):
        if looks_like_credential(value):
            return True
        if "://" in value or "@" in value:  # a URL, possibly without its scheme ("user:key@host/v1")
            return url_secret_problem(value if "://" in value else f"http://{value}") is not None
        return False
    return find_secret(value, check_names=False) is not None
