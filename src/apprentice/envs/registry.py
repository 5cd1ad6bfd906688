"""`[[orchestrator.env]]` -> Environment: a built-in by name, or a user factory by import path.

id = "reverse-text"                 built-in; args validated by its pydantic args model (unknown keys fail)
id = "my_pkg.my_envs:make_env"      user factory, called as make_env(**args) (plus seed=, if it takes one)
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from apprentice.config import EnvConfig
from apprentice.envs.base import EnvError, Environment
from apprentice.envs.prompts import PromptsArgs, make_prompts_env
from apprentice.envs.reverse_text import ReverseTextArgs, make_reverse_text_env
from apprentice.envs.tool_calculator import ToolCalculatorArgs, make_tool_calculator_env
from apprentice.envs.verifiers_env import VerifiersArgs, make_verifiers_env


@dataclass(frozen=True)
class Builtin:
    args: type[BaseModel]
    """The environment's arguments (`[[orchestrator.env]].args`), validated with unknown keys forbidden."""
    build: Callable[[Any, int], Environment]
    """(validated args, run seed) -> environment."""


BUILTINS: dict[str, Builtin] = {
    "prompts": Builtin(PromptsArgs, make_prompts_env),
    "reverse-text": Builtin(ReverseTextArgs, make_reverse_text_env),
    "tool-calculator": Builtin(ToolCalculatorArgs, make_tool_calculator_env),
    "verifiers": Builtin(VerifiersArgs, make_verifiers_env),  # optional extra, imported lazily
}


def load_environment(cfg: EnvConfig, *, seed: int = 0) -> Environment:
    """Build the environment `cfg` names; `seed` (the run's seed) is used unless the args set their own.

    Raises EnvError with the environment id and the fix for: an unknown id, an import path that does not
    import, arguments the environment does not accept, and a factory returning a non-Environment.
    """
    builtin = BUILTINS.get(cfg.id)
    if builtin is not None:
        env = builtin.build(_validated_args(cfg, builtin), seed)
    else:
        _check_import_path_form(cfg.id)
        env = _build_imported(cfg, seed)
    check_environment(env, cfg.id)
    return env


def check_env_config(cfg: EnvConfig) -> None:
    """Validate an environment's id and (for built-ins) its args without building it: no files are read and
    no user code is imported, so `--dry-run` can catch typos before a run starts. Raises EnvError."""
    builtin = BUILTINS.get(cfg.id)
    if builtin is not None:
        _validated_args(cfg, builtin)
    else:
        _check_import_path_form(cfg.id)


def _check_import_path_form(env_id: str) -> None:
    if ":" not in env_id:
        close = difflib.get_close_matches(env_id, list(BUILTINS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise EnvError(
            f"unknown environment {env_id!r}: {hint}built-ins are {', '.join(sorted(BUILTINS))}; "
            "a user environment is an import path 'package.module:factory'"
        )


def _validated_args(cfg: EnvConfig, builtin: Builtin) -> BaseModel:
    try:
        args = builtin.args.model_validate(cfg.args)
    except ValidationError as e:
        problems = "; ".join(_describe(err, builtin.args) for err in e.errors())
        accepted = ", ".join(builtin.args.model_fields)
        raise EnvError(f"environment {cfg.id!r}: {problems} (accepted args: {accepted})") from e
    return args


def _describe(err: Any, args_model: type[BaseModel]) -> str:
    """One argument problem; an unknown argument gets the closest accepted name."""
    where = f"args.{'.'.join(map(str, err['loc'])) or '(root)'}"
    if err["type"] == "extra_forbidden" and err["loc"]:
        close = difflib.get_close_matches(str(err["loc"][-1]), list(args_model.model_fields), n=1)
        return f"{where}: unknown argument" + (f"; did you mean {close[0]!r}?" if close else "")
    if err["type"] == "missing" or not err["loc"]:
        return f"{where}: {err['msg']}"
    return f"{where}: {err['msg']} (got {err['input']!r})"


def _import_factory(env_id: str) -> Callable[..., Any]:
    module_name, _, attr_path = env_id.rpartition(":")
    if not module_name or not attr_path:
        raise EnvError(f"environment {env_id!r}: an import path is 'package.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise EnvError(
                f"environment {env_id!r}: cannot import module {module_name!r} ({e}); install its package or "
                "add its directory to PYTHONPATH"
            ) from e
        raise EnvError(f"environment {env_id!r}: importing {module_name!r} failed: {e}") from e
    except (ImportError, SyntaxError) as e:  # the module itself is broken (a bad import in it, a syntax error)
        raise EnvError(f"environment {env_id!r}: importing {module_name!r} failed: {type(e).__name__}: {e}") from e
    obj: Any = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))
            raise EnvError(
                f"environment {env_id!r}: module {module_name!r} has no attribute {attr_path!r}; "
                f"its callables are: {', '.join(public) or '(none)'}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise EnvError(f"environment {env_id!r}: {attr_path!r} is a {type(obj).__name__}, not a callable factory")
    return obj  # type: ignore[no-any-return]


def _build_imported(cfg: EnvConfig, seed: int) -> Environment:
    factory = _import_factory(cfg.id)
    kwargs = dict(cfg.args)
    try:
        signature: inspect.Signature | None = inspect.signature(factory)
    except (TypeError, ValueError):  # some C callables have no introspectable signature
        signature = None
    if signature is not None:
        if "seed" in signature.parameters and "seed" not in kwargs:
            kwargs["seed"] = seed
        try:
            signature.bind(**kwargs)
        except TypeError as e:
            raise EnvError(
                f"environment {cfg.id!r}: args {cfg.args} do not fit its factory{signature} ({e}); "
                "fix [[orchestrator.env]].args"
            ) from e
    try:
        return factory(**kwargs)  # type: ignore[no-any-return]
    except TypeError as e:
        raise EnvError(f"environment {cfg.id!r}: its factory raised TypeError with args {cfg.args}: {e}") from e


def check_environment(env: Any, env_id: str) -> None:
    """Raise EnvError unless `env` has what the orchestrator uses: name, tools, tasks(split), async rollout."""
    problems = [f"no attribute {m!r}" for m in ("name", "tools", "tasks", "rollout") if not hasattr(env, m)]
    if hasattr(env, "tasks") and not callable(env.tasks):
        problems.append("'tasks' is not callable")
    if hasattr(env, "rollout") and not inspect.iscoroutinefunction(env.rollout):
        problems.append("'rollout' is not an async method")
    if hasattr(env, "name") and not isinstance(env.name, str):
        problems.append(f"'name' is a {type(env.name).__name__}, not a str")
    if problems:
        raise EnvError(
            f"environment {env_id!r}: its factory returned a {type(env).__name__} that is not an Environment "
            f"({'; '.join(problems)}); see apprentice.envs.base.Environment"
        )
