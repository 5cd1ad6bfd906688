"""`apprentice serve` as a process: `apprentice.inference.server.main(argv)` under `python -m`."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
from transformers import AutoTokenizer

from apprentice.inference.launch import free_port
from apprentice.inference.server import main
from apprentice.testing.tiny import save_tiny_student


def test_missing_api_key_variable_exits_2_naming_it(tmp_path: Path, capsys: object) -> None:
    os.environ.pop("APPRENTICE_SERVE_TEST_UNSET", None)
    assert main([str(tmp_path), "--api-key-var", "APPRENTICE_SERVE_TEST_UNSET"]) == 2
    assert "APPRENTICE_SERVE_TEST_UNSET" in capsys.readouterr().err  # type: ignore[attr-defined]


def test_a_model_directory_that_does_not_exist_exits_2_naming_it(tmp_path: Path, capsys: object) -> None:
    """Was a transformers traceback ("Repo id must be in the form ...")."""
    missing = tmp_path / "no-such-model"
    assert main([str(missing)]) == 2
    err = capsys.readouterr().err  # type: ignore[attr-defined]
    assert f"error: MODEL {missing}: could not load it" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_non_positive_body_cap_exits_2(tmp_path: Path, capsys: object) -> None:
    assert main([str(tmp_path), "--max-body-mb", "0"]) == 2
    assert "--max-body-mb" in capsys.readouterr().err  # type: ignore[attr-defined]
    assert main([str(tmp_path), "--body-timeout-s", "0"]) == 2
    assert main([str(tmp_path), "--max-request-tokens", "0"]) == 2
    assert "--max-request-tokens" in capsys.readouterr().err  # type: ignore[attr-defined]


def test_serve_process_with_key_and_hidden_system_prompt(tmp_path: Path) -> None:
    model_dir = save_tiny_student(tmp_path / "student")
    prompt_file = tmp_path / "hidden.txt"
    prompt_file.write_text("HIDDEN INSTRUCTIONS\n")
    port = free_port()
    env = {**os.environ, "SERVE_KEY": "sk-cli", "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, "-m", "apprentice.inference.server", str(model_dir), "--port", str(port),
            "--api-key-var", "SERVE_KEY", "--system-prompt-file", str(prompt_file), "--max-batch-size", "4",
            "--max-body-mb", "0.01", "--max-request-tokens", "8", "--body-timeout-s", "30"]  # fmt: skip
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.communicate()[0]
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        headers = {"Authorization": "Bearer sk-cli"}
        assert httpx.get(f"{base}/v1/models", timeout=10).status_code == 401
        models = httpx.get(f"{base}/v1/models", headers=headers, timeout=10).json()
        assert models["data"][0]["id"] == str(model_dir)
        body = {"model": "any", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                "return_token_ids": True}  # fmt: skip
        r = httpx.post(f"{base}/v1/chat/completions", json=body, headers=headers, timeout=60).json()
        assert r["choices"][0]["finish_reason"] in ("stop", "length")
        prompt = AutoTokenizer.from_pretrained(model_dir).decode(r["prompt_token_ids"])
        assert "HIDDEN INSTRUCTIONS" in prompt  # prepended by the server, never sent by the client
        big = {**body, "messages": [{"role": "user", "content": "x" * 20_000}]}  # over --max-body-mb 0.01
        assert httpx.post(f"{base}/v1/chat/completions", json=big, headers=headers, timeout=60).status_code == 413
        many = httpx.post(f"{base}/v1/chat/completions", json={**body, "n": 3}, headers=headers, timeout=60)
        assert many.status_code == 400 and "limit of 8 generated tokens" in many.json()["error"]["message"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
