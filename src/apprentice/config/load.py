"""Loading: TOML files merged left to right, then dotted CLI overrides, then validation with readable errors.

    cfg = load_config(["base.toml", "run.toml"], ["--trainer.optim.lr", "3e-6"])

Tables merge key by key; any other value (arrays included, so `[[orchestrator.env]]`) is replaced whole by
the later file. Every error is a `ConfigError` whose message names the file, the key and the fix.
"""

from __future__ import annotations

import difflib
import tomllib
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tomli_w
from pydantic import BaseModel, ValidationError

from apprentice.config.root import Config
from apprentice.config.secrets import contains_secret, looks_like_credential
from apprentice.errors import UsageError
from apprentice.fsio import write_text

Origins = dict[tuple[str, ...], str]
"""Where each leaf key came from (a file path or "command line"), for error messages."""


class ConfigError(UsageError):
    """A config that cannot be loaded or validated; the message is meant for the user as is."""


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (check the path; it is relative to {Path.cwd()})")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: TOML syntax error: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e})") from None


def merge(base: dict[str, Any], update: dict[str, Any], origin: str, origins: Origins, prefix: tuple[str, ...] = ()) -> dict[str, Any]:
    """Merge `update` into a copy of `base`: tables recursively, everything else replaced."""
    out = dict(base)
    for key, value in update.items():
        path = (*prefix, key)
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value, origin, origins, path)
        else:
            out[key] = value
            for known in [p for p in origins if p[: len(path)] == path]:
                del origins[known]
            _record(origins, path, value, origin)
    return out


def _record(origins: Origins, path: tuple[str, ...], value: Any, origin: str) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _record(origins, (*path, k), v, origin)
    else:
        origins[path] = origin


def parse_value(raw: str) -> Any:
    """A CLI value as TOML (`3e-6`, `false`, `[1, 2]`, `{a = 1}`, `"text"`), else the raw string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def parse_overrides(args: Sequence[str]) -> list[tuple[str, Any]]:
    """`["--a.b", "1", "--c=x"]` -> `[("a.b", 1), ("c", "x")]`."""
    pairs: list[tuple[str, Any]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --section.key VALUE")
        key = arg[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override --{key} has no value: write --{key} VALUE")
            raw = args[i + 1]
            i += 2
        pairs.append((field_key(key), parse_value(raw)))
    return pairs


FREE_FORM_TABLES = frozenset({"headers", "extra_body", "args"})
"""Config keys whose tables hold the user's own names (HTTP headers, request fields, environment arguments)."""


def field_key(dotted: str) -> str:
    """`a.use-token-client` -> `a.use_token_client` (config keys are snake_case); a name inside a free-form table
    stays as written (`headers.HTTP-Referer` is a header), as does a negative array index (for its error)."""
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if not part.lstrip("-").isdigit():
            parts[i] = part.replace("-", "_")
        if parts[i] in FREE_FORM_TABLES:
            break
    return ".".join(parts)


def apply_override(data: dict[str, Any], dotted: str, value: Any, origins: Origins) -> None:
    """Set `data[a][b]... = value` for `dotted = "a.b..."`; numeric parts index into arrays of tables."""
    parts = dotted.split(".")
    node: Any = data
    for depth, part in enumerate(parts[:-1]):
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            node = node[_index(node, part, dotted, ".".join(parts[:depth]))]
        else:
            child = node.get(part)
            if child is None and parts[depth + 1].isdigit():
                raise ConfigError(
                    f"--{dotted}: no config file sets {where}, so there is no entry {parts[depth + 1]} to override; "
                    f"write the array in a TOML file (e.g. [[{where}]] tables) and override its entries from there"
                )
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, (dict, list)):
                raise ConfigError(f"--{dotted}: {where} is a value, not a table, so it has no key {parts[depth + 1]!r}")
            node = child
    last = parts[-1]
    if isinstance(node, list):
        node[_index(node, last, dotted, ".".join(parts[:-1]))] = value
    else:
        node[last] = value
    path = tuple(parts)
    for known in [p for p in origins if p[: len(path)] == path]:
        del origins[known]
    _record(origins, path, value, "command line")


def _index(items: list[Any], part: str, dotted: str, array: str) -> int:
    if not part.isdigit() or int(part) >= len(items):
        raise ConfigError(
            f"--{dotted}: {part!r} is not an index of {array}, an array of {len(items)} entries; "
            f"use an index 0..{len(items) - 1}"
        )
    return int(part)


def load_config(paths: Sequence[str | Path], overrides: Sequence[str] = ()) -> Config:
    """Read, merge, override and validate. Raises `ConfigError` with a user-facing message."""
    if not paths:
        raise ConfigError("no config file given: pass at least one CONFIG.toml (see configs/ for examples)")
    data: dict[str, Any] = {}
    origins: Origins = {}
    for path in paths:
        data = merge(data, read_toml(path), str(path), origins)
    for dotted, value in parse_overrides(overrides):
        apply_override(data, dotted, value, origins)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_errors(e, origins)) from None


# Fields whose values are never echoed in errors: a user may have pasted a secret there by mistake. Any other
# value that looks like a credential (apprentice.config.secrets) is not echoed either.
_NEVER_ECHO = {"api_key_var", "headers", "extra_body"}
# ... nor a value given where one of these whole sections belongs (`--orchestrator.rollout_model sk-...`).
_NEVER_ECHO_WHOLE = {"rollout_model", "student_endpoint"}


def format_errors(error: ValidationError, origins: Origins) -> str:
    lines = [f"invalid config ({error.error_count()} problem{'s' if error.error_count() > 1 else ''}):"]
    for err in error.errors():
        loc, model = _resolve(err["loc"])
        key = ".".join(str(p) for p in loc)
        origin = _origin_of(loc, origins)
        if any(looks_like_credential(str(p)) for p in loc):  # a key pasted where a key NAME belongs
            lines.append(f"  - a key at {_redacted(loc)} looks like a credential; secrets must not go in the config{origin}")
            continue
        if err["type"] == "extra_forbidden":
            section, name = ".".join(str(p) for p in loc[:-1]) or "top level", str(loc[-1])
            valid = sorted(model.model_fields) if model is not None else []
            close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
            hint = f"Did you mean {close[0]!r}? " if close else ""
            lines.append(f"  - unknown key {name!r} in [{section}]{origin}. {hint}Valid keys: {', '.join(valid)}")
            continue
        msg = err["msg"].removeprefix("Value error, ")
        if not loc:
            lines.append(f"  - {msg}")
            continue
        if err["type"] == "missing":
            field = model.model_fields.get(str(loc[-1])) if model is not None else None
            is_table = field is not None and bool(_models_in(field.annotation))
            section = ".".join(str(p) for p in loc[:-1])
            fix = f"add a [{key}] section" if is_table else f"set {loc[-1]} = ... under [{section or 'top level'}]"
            lines.append(f"  - {key}: missing; this key is required: {fix}{origin}")
            continue
        hidden = (
            _NEVER_ECHO & {str(p) for p in loc}
            or str(loc[-1]) in _NEVER_ECHO_WHOLE
            or isinstance(err.get("input"), dict)
            or contains_secret(err.get("input"))  # e.g. `base_url = "http://user:sk-...@host"`, a key in a list
        )
        shown = "" if hidden else f" (got {err.get('input')!r})"
        lines.append(f"  - {key}: {msg}{shown}{origin}")
    return "\n".join(lines)


def _redacted(loc: tuple[int | str, ...]) -> str:
    return ".".join("<redacted>" if looks_like_credential(str(p)) else str(p) for p in loc) or "top level"


def _resolve(loc: tuple[int | str, ...]) -> tuple[tuple[int | str, ...], type[BaseModel] | None]:
    """Drop pydantic's union tags from an error location; also return the model class that owns its last key."""
    model: type[BaseModel] | None = Config
    owner: type[BaseModel] | None = Config
    clean: list[int | str] = []
    i = 0
    while i < len(loc):
        part = loc[i]
        i += 1
        clean.append(part)
        if isinstance(part, int) or model is None:
            continue
        owner = model
        field = model.model_fields.get(part)
        candidates = _models_in(field.annotation) if field is not None else []
        nxt = loc[i] if i < len(loc) else None
        tagged = [c for c in candidates if len(candidates) > 1 and _tag(c) == nxt]
        if tagged:
            i += 1  # "trainer.loss.sft.x": the "sft" is pydantic's union tag, not a config key
        model = tagged[0] if tagged else (candidates[0] if candidates else None)
    return tuple(clean), owner


def _tag(model: type[BaseModel]) -> Any:
    field = model.model_fields.get("type")
    return field.default if field is not None else None


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """BaseModel classes inside an annotation (Optional, unions, list[...], Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _models_in(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType, list, tuple) or origin is not None:
        for arg in typing.get_args(annotation):
            found.extend(_models_in(arg))
    return found


def _origin_of(loc: tuple[int | str, ...], origins: Origins) -> str:
    key = tuple(str(p) for p in loc)
    found = list(dict.fromkeys(origin for path, origin in origins.items() if path[: len(key)] == key))
    # A key inside an array of tables: the array was set whole, by the file (or override) that wrote it last.
    enclosing = [key[:n] for n in range(len(key) - 1, 0, -1) if key[:n] in origins]
    if not found and enclosing:
        found = [origins[enclosing[0]]]
    return f" [from {', '.join(found)}]" if found else ""


def dump_config(cfg: Config) -> str:
    """The fully resolved config as TOML. Secrets cannot appear: the config only ever holds env-var names."""
    return tomli_w.dumps(_prune(cfg, cfg.model_dump(mode="json", exclude_none=True)))


def _prune(section: BaseModel, data: dict[str, Any]) -> dict[str, Any]:
    """Drop empty free-form tables (e.g. `headers = {}`): they are the defaults and only add noise to the dump.

    Only a section's own fields are pruned; inside a free-form table (`extra_body = {a = {}}`) an empty table
    is the user's value and is kept.
    """
    out: dict[str, Any] = {}
    for key, value in data.items():
        child = getattr(section, key, None)
        if isinstance(child, BaseModel) and isinstance(value, dict):
            value = _prune(child, value)
        elif value == {}:
            continue
        out[key] = value
    return out


def write_atomic(path: Path, text: str) -> None:
    """Write UTF-8 text durably via a temporary file and rename (see apprentice.fsio)."""
    write_text(path, text)


def write_resolved(cfg: Config) -> Path:
    """Write OUTPUT/config.toml (the fully resolved config) atomically."""
    path = Path(cfg.output_dir) / "config.toml"
    write_atomic(path, dump_config(cfg))
    return path
