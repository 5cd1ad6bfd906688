"""On-disk teacher response cache: a repeated or resumed run never pays twice for the same request.

Layout (sharded so no directory holds more than a few thousand files):

    cache_dir/ab/cd/abcd...64 hex....json

The name is sha256 of the canonical JSON of {"request", "key"}: the exact request body sent (model, messages,
tools, sampling; never headers, where credentials live) and the caller's rollout key, so two samples of one
prompt (different keys) stay distinct while a resumed run finds each again. The endpoint URL is deliberately
not part of the key: a teacher restarted on another port (or host) serving the same model name still hits.
Each file holds {"key", "request", "response"}; the request is kept for debugging and to detect hash collisions.
Writes are atomic (temp file in the same directory + os.replace): a run killed mid-write leaves no partial entry.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from apprentice.config import write_atomic


def cache_digest(request: dict[str, Any], key: str) -> str:
    """Stable hex digest of one request (dict key order does not matter)."""
    canonical = json.dumps(
        {"request": request, "key": key},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class ResponseCache:
    """Maps (endpoint, request body, key) -> a stored response dict."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = Path(cache_dir)

    def path_for(self, request: dict[str, Any], key: str) -> Path:
        digest = cache_digest(request, key)
        return self.cache_dir / digest[:2] / digest[2:4] / f"{digest}.json"

    def get(self, request: dict[str, Any], key: str) -> dict[str, Any] | None:
        path = self.path_for(request, key)
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        # A sha256 collision is not a practical concern, but a hand-edited or foreign file must not be trusted.
        if entry.get("key") != key or entry.get("request") != json.loads(json.dumps(request)):
            return None
        response: dict[str, Any] = entry["response"]
        return response

    def put(self, request: dict[str, Any], key: str, response: dict[str, Any]) -> Path:
        path = self.path_for(request, key)
        write_atomic(path, json.dumps({"key": key, "request": request, "response": response}, ensure_ascii=False))
        return path
