"""`apprentice` command line: one sub-command per process kind (DESIGN.md section 1, fixed names).

Config-taking commands share one shape: `apprentice CMD CONFIG.toml [MORE.toml ...] [--dotted.key VALUE ...]
[--dry-run]`. Errors the user can fix are printed as one message on stderr (exit 2), never a traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from apprentice.config import Config, ConfigError, ModelConfig, dump_config, load_config
from apprentice.errors import ApprenticeError, UsageError

USAGE = """usage: apprentice COMMAND [ARGS]

commands:
  distill CONFIG.toml [...] [--key.sub VALUE] [--dry-run]   distill a teacher endpoint into the student (orchestrator + trainer)
  rl CONFIG.toml [...] [--key.sub VALUE] [--dry-run]        on-policy RL: inference server + orchestrator + trainer
  train CONFIG.toml [...] [--key.sub VALUE] [--dry-run]     the trainer alone (run it under torchrun for several ranks)
  orchestrate CONFIG.toml [...] [--key.sub VALUE] [--dry-run]  the orchestrator alone (rollouts -> OUTPUT/rollouts)
  serve MODEL [--port N] [--host H] [...]                   a local OpenAI-compatible chat server over a transformers model
  eval CONFIG.toml [...] --model DIR_OR_URL [--dry-run]     reward of a model on held-out tasks of the configured environments

Config files merge left to right; `--section.key VALUE` overrides any key (see configs/ for examples).
`apprentice serve --help` lists the server's options."""


@dataclass
class ConfigArgs:
    paths: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)
    dry_run: bool = False
    flags: dict[str, str] = field(default_factory=dict)
    """Command-specific options (e.g. eval's --model), taken out before config overrides."""


def parse_config_args(argv: Sequence[str], flags: Sequence[str] = ()) -> ConfigArgs:
    """Split `CONFIG.toml ... --dry-run --model X --a.b 1` into paths, known flags and config overrides."""
    out = ConfigArgs()
    i = 0
    while i < len(argv) and not argv[i].startswith("--"):
        out.paths.append(argv[i])
        i += 1
    rest = list(argv[i:])
    i = 0
    while i < len(rest):
        arg = rest[i]
        name = arg[2:].split("=", 1)[0]
        if arg == "--dry-run":
            out.dry_run = True
            i += 1
        elif name in flags:
            if "=" in arg:
                out.flags[name] = arg.split("=", 1)[1]
                i += 1
            elif i + 1 < len(rest):
                out.flags[name] = rest[i + 1]
                i += 2
            else:
                raise UsageError(f"--{name} needs a value")
        else:
            out.overrides.append(arg)
            if "=" not in arg and i + 1 < len(rest):
                out.overrides.append(rest[i + 1])
                i += 2
            else:
                i += 1
    if not out.paths:
        raise UsageError("no config file given: pass at least one CONFIG.toml first (see configs/ for examples)")
    return out


def _require_mode(cfg: Config, mode: str, command: str) -> None:
    if cfg.mode != mode:
        hint = (
            "set [orchestrator.rollout_model] (the teacher endpoint), use_token_client = false and "
            '[trainer.loss] type = "sft"'
            if mode == "distill"
            else "remove [orchestrator.rollout_model] and add an [inference] section"
        )
        article = "an" if mode == "rl" else "a"
        raise ConfigError(f"`apprentice {command}` needs {article} {mode}-mode config: {hint}")


def check_environments(cfg: Config) -> None:
    """Environment ids and built-in args are checked with the config, so --dry-run catches their typos too."""
    from apprentice.envs.base import EnvError
    from apprentice.envs.registry import check_env_config

    for i, env in enumerate(cfg.orchestrator.env):
        try:
            check_env_config(env)
        except EnvError as e:
            raise ConfigError(f"orchestrator.env[{i}]: {e}") from None


def _hub_cached(repo_id: str, filename: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, filename), str)
    except ValueError:  # not a valid repo id at all
        return False


def check_student(model: ModelConfig) -> None:
    """Fail before any process starts when the student cannot be found, naming the key and the fix.

    A local directory must hold a Hugging Face model (config.json, or model.gguf_file); anything else is taken for
    a Hugging Face id, which offline (HF_HUB_OFFLINE=1) must already be in the local cache.
    """
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    for key, source, needed in (
        ("model.name", model.name, model.gguf_file or "config.json"),
        ("model.tokenizer", model.tokenizer, "tokenizer_config.json"),
    ):
        if source is None:
            continue
        path = Path(source).expanduser()
        if path.is_dir():
            if key == "model.name" and not (path / needed).is_file():
                what = f"model.gguf_file = {needed!r}" if model.gguf_file else "config.json"
                raise ConfigError(f"{key} = {source!r} is a directory without {what}: not a Hugging Face model directory. Fix: point {key} at the directory save_pretrained wrote (or set model.gguf_file)")
            continue
        if source.startswith(("/", "./", "../", "~")) or source.count("/") > 1 or path.exists():
            raise ConfigError(f"{key} = {source!r}: no such model directory. Fix: point {key} at a local model directory or use a Hugging Face id")
        if offline and not _hub_cached(source, needed):
            raise ConfigError(
                f"{key} = {source!r} is not a local directory, and as a Hugging Face id it is not in the local cache "
                f"while HF_HUB_OFFLINE=1. Fix: use a local model directory, or download it once with network access"
            )


def _configured(argv: Sequence[str], command: str, *, mode: str | None = None, flags: Sequence[str] = ()) -> tuple[Config, ConfigArgs] | None:
    """Load and validate the config of a command; with --dry-run print it and return None (nothing to run)."""
    args = parse_config_args(argv, flags)
    cfg = load_config(args.paths, args.overrides)
    if mode is not None:
        _require_mode(cfg, mode, command)
    check_environments(cfg)
    if args.dry_run:
        print(dump_config(cfg), end="")
        return None
    return cfg, args


def cmd_distill(argv: Sequence[str]) -> int:
    if (loaded := _configured(argv, "distill", mode="distill")) is None:
        return 0
    from apprentice.launcher import check_teacher_key, run_distill

    check_teacher_key(loaded[0])
    check_student(loaded[0].model)
    return run_distill(loaded[0])


def cmd_rl(argv: Sequence[str]) -> int:
    from apprentice.config.rl import check_rl_config

    args = parse_config_args(argv)
    cfg = load_config(args.paths, args.overrides)
    _require_mode(cfg, "rl", "rl")
    check_environments(cfg)
    check_rl_config(cfg)
    if args.dry_run:
        print(dump_config(cfg), end="")
        return 0
    check_student(cfg.model)  # before three processes start and each says so
    from apprentice.launcher_rl import run_rl

    return run_rl(cfg)


def cmd_train(argv: Sequence[str]) -> int:
    if (loaded := _configured(argv, "train")) is None:
        return 0
    check_student(loaded[0].model)
    from apprentice.trainer.train import main as train_main

    train_main(loaded[0])
    return 0


def cmd_orchestrate(argv: Sequence[str]) -> int:
    if (loaded := _configured(argv, "orchestrate")) is None:
        return 0
    check_student(loaded[0].model)
    from apprentice.orchestrator.loop import main as orchestrate_main

    orchestrate_main(loaded[0])
    return 0


def cmd_eval(argv: Sequence[str]) -> int:
    if "--model" not in argv and not any(a.startswith("--model=") for a in argv):
        raise UsageError("eval needs --model DIR_OR_URL (a local model directory, or an OpenAI-compatible base URL)")
    if (loaded := _configured(argv, "eval", flags=("model", "num-tasks"))) is None:
        return 0
    from apprentice.eval import main as eval_main

    cfg, args = loaded
    num_tasks = _positive_int(args.flags["num-tasks"], "--num-tasks") if "num-tasks" in args.flags else None
    return eval_main(cfg, args.flags["model"], num_tasks=num_tasks)


def _positive_int(value: str, flag: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise UsageError(f"{flag} takes a positive whole number (how many tasks per environment), got {value!r}")
    return number


def cmd_serve(argv: Sequence[str]) -> int:
    from apprentice.inference.server import main as serve_main

    return serve_main(list(argv))


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "distill": cmd_distill,
    "rl": cmd_rl,
    "train": cmd_train,
    "orchestrate": cmd_orchestrate,
    "eval": cmd_eval,
    "serve": cmd_serve,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(command, list(COMMANDS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        print(f"apprentice: unknown command {command!r}{hint} (see apprentice --help)", file=sys.stderr)
        return 2
    if command != "serve" and rest and rest[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    try:
        return COMMANDS[command](rest)
    except ApprenticeError as e:  # expected failures: one message, no traceback (unexpected ones propagate)
        print(f"apprentice {command}: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
