"""vLLM worker extension (loaded inside vLLM's workers via `--worker-extension-cls`): new weights for the running
model in place, so the server never restarts between RL steps. Two ways in, both called through vLLM's dev-mode
`POST /collective_rpc {"method": ..., "args": [...]}` (inference/backends.py), which runs the method on every
worker (one per GPU) and answers with each one's result:

    reload(dir)                            trainer.weight_broadcast = "filesystem": verify a published Hugging Face
                                           directory and read its safetensors into the model
    apprentice_rank()                      this worker's rank in vLLM (the trainer counts the workers with it)
    apprentice_join(host, port, size, s)   trainer.weight_broadcast = "collective": join the trainer's weight group
                                           (apprentice/collective.py) as rank 1 + the worker's rank
    apprentice_receive(step, manifest)     receive one update whole into host memory (the model keeps its weights)
    apprentice_apply(step)                 load the staged update of `step` or newer into the model
    apprentice_status()                    {"staged", "group", "error"}

A receive that fails or stops halfway stages nothing and drops the group (the trainer joins again): only a
complete update (every tensor and the trailer) is ever loaded, so the server never samples with mixed weights.
While a method runs the engine takes no decode step (vLLM runs collective_rpc between steps), so the receive
pauses sampling for as long as the wire takes; the load is the same in-place `load_weights` as `reload`.

Imported by vLLM, never by apprentice itself (tests drive it with a stand-in for vLLM's model runner).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import safe_open

from apprentice import collective
from apprentice.handoff.weights import verify


def _tensors(directory: Path) -> Iterator[tuple[str, torch.Tensor]]:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory}: no *.safetensors files to load")
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield name, f.get_tensor(name)


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class WeightReloader:
    """Mixed into vLLM's worker class; `self.model_runner` and `self.rank` are the worker's."""

    model_runner: Any
    rank: int
    _apprentice_group: Any = None
    _apprentice_staged: tuple[int, list[tuple[str, torch.Tensor]]] | None = None
    _apprentice_error: str | None = None

    def reload(self, path: str) -> int:
        """Verify `path`, then load every tensor of it into the running model (vLLM maps HF names to its fused
        layers); a damaged directory is set aside and the error (one line) goes back to the caller."""
        verify(Path(path))
        model = self.model_runner.model
        loaded = model.load_weights(weights=_tensors(Path(path)))
        _synchronize()
        return len(loaded) if loaded is not None else 0

    def apprentice_rank(self) -> int:
        return int(self.rank)

    def apprentice_join(self, host: str, port: int | str, size: int | str, timeout_s: float | str) -> int:
        """Join the trainer's weight group; returns once every member has (the trainer opens it meanwhile)."""
        self._apprentice_group = None
        self._apprentice_group = collective.open_group(host, int(port), 1 + int(self.rank), float(timeout_s), int(size))
        return 1 + int(self.rank)

    def apprentice_receive(self, step: int | str, manifest: str) -> int:
        """Receive the update of `step` (`manifest`: the JSON list [[name, shape, dtype], ...] the trainer sends)
        into host memory and stage it; a failure stages nothing, drops the group and raises (HTTP 500 to the
        trainer, which publishes that step to disk instead)."""
        step = int(step)
        entries: list[collective.ManifestEntry] = [(str(n), [int(d) for d in shape], str(dt)) for n, shape, dt in json.loads(manifest)]
        group = self._apprentice_group
        if group is None:
            raise RuntimeError(f"no weight group to receive step {step} from: apprentice_join first")
        unknown = sorted({dtype for _, _, dtype in entries} - set(collective.DTYPE_NAMES))
        if unknown:
            raise ValueError(f"the update of step {step} carries dtypes {unknown} the wire does not")
        staging: list[tuple[str, torch.Tensor]] = []

        def target(name: str, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
            staging.append((name, torch.empty(shape, dtype=dtype)))
            return staging[-1][1]

        try:
            collective.receive_update(group, entries, step, target)
        except Exception as e:
            self._apprentice_group, self._apprentice_error = None, f"step {step}: {type(e).__name__}: {e}"
            raise
        self._apprentice_staged, self._apprentice_error = (step, staging), None
        return step

    def apprentice_apply(self, step: int | str) -> int:
        """Load the staged update of `step` (or the newer one that replaced it) into the model; the step now
        served. RuntimeError when none is staged: the model keeps its weights."""
        staged = self._apprentice_staged
        if staged is None or staged[0] < int(step):
            have = f"step {staged[0]}" if staged else "none"
            raise RuntimeError(f"no complete update of step {step} or newer is staged (staged: {have}; "
                               f"last error: {self._apprentice_error})")  # fmt: skip
        self._apprentice_staged = None
        self.model_runner.model.load_weights(weights=iter(staged[1]))
        _synchronize()
        return staged[0]

    def apprentice_status(self) -> dict[str, Any]:
        staged = self._apprentice_staged
        return {"staged": staged[0] if staged else None, "group": self._apprentice_group is not None,
                "error": self._apprentice_error}  # fmt: skip
