"""How `apprentice rl` splits the cores between the inference server and the trainer (apprentice/cpu_budget.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from apprentice.config import load_config
from apprentice.cpu_budget import split_cores
from apprentice.launcher_rl import thread_budget


@pytest.mark.parametrize(
    ("cores", "ranks", "expected"),
    [(1, 1, (1, 1)), (2, 1, (1, 1)), (3, 1, (1, 2)), (16, 1, (8, 8)), (16, 2, (8, 4)), (4, 8, (2, 1))],
)
def test_the_server_gets_half_the_cores_and_the_trainer_ranks_share_the_rest(cores: int, ranks: int, expected: tuple[int, int]) -> None:
    assert split_cores(cores, ranks) == expected


def test_explicit_thread_counts_are_kept() -> None:
    assert split_cores(16, 1, server=2) == (2, 14)
    assert split_cores(16, 1, trainer=3) == (8, 3)
    assert split_cores(2, 1, server=4, trainer=4) == (4, 4)  # oversubscribing is the user's call


def write_config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "rl.toml"
    path.write_text(f"""
output_dir = "{tmp_path / 'out'}"
[model]
name = "m"
[[orchestrator.env]]
id = "reverse-text"
[inference]
port = 8001
{extra}
""")
    return path


def test_the_launcher_budget_follows_the_config_and_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("apprentice.launcher_rl.usable_cores", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert thread_budget(load_config([write_config(tmp_path)])) == (4, 4)
    assert thread_budget(load_config([write_config(tmp_path, "threads = 2")])) == (2, 6)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice for the trainer stands
    assert thread_budget(load_config([write_config(tmp_path)])) == (4, None)
    assert thread_budget(load_config([write_config(tmp_path)], ["--trainer.threads", "5"])) == (4, 5)


def test_server_and_trainer_that_take_turns_each_get_every_core(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert split_cores(2, 1, overlap=False) == (2, 2)
    assert split_cores(16, 2, overlap=False) == (16, 8)
    assert split_cores(16, 1, server=3, overlap=False) == (3, 16)
    monkeypatch.setattr("apprentice.launcher_rl.usable_cores", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    turns = load_config([write_config(tmp_path)], ["--orchestrator.max_async_level", "0"])
    assert thread_budget(turns) == (8, 8)


def test_idle_threads_sleep_unless_the_user_chose_a_wait_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    from apprentice.cpu_budget import wait_policy

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert wait_policy() == {"OMP_WAIT_POLICY": "PASSIVE"}
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert wait_policy() == {}


def test_the_launched_processes_get_the_budget_and_sleeping_idle_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What `apprentice rl` starts: the server's --threads and the trainer ranks' OMP_NUM_THREADS from the budget,
    OMP_WAIT_POLICY=PASSIVE for both (not the orchestrator), unless the user set a wait policy."""
    from apprentice.launcher_rl import processes

    monkeypatch.setattr("apprentice.launcher_rl.usable_cores", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    config = write_config(tmp_path)
    plan = processes(load_config([config], ["--trainer.num_processes", "2"]), config, "m")
    commands, envs = plan.commands, plan.envs
    assert plan.trainers == ("trainer", "trainer.1")
    assert set(commands) == {"inference", "orchestrator", "trainer", "trainer.1"}
    server = commands["inference"]
    assert server[server.index("--threads") + 1] == "4"
    for name in ("inference", "trainer", "trainer.1"):
        assert envs[name]["OMP_WAIT_POLICY"] == "PASSIVE"
    assert envs["trainer"]["OMP_NUM_THREADS"] == envs["trainer.1"]["OMP_NUM_THREADS"] == "2"
    assert "orchestrator" not in envs
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the user's choice reaches them unchanged
    plan = processes(load_config([config]), config, "m")
    assert all("OMP_WAIT_POLICY" not in env for env in plan.envs.values())
