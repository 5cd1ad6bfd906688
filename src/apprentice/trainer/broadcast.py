"""The trainer's sending end of `trainer.weight_broadcast = "collective"` (the wire: apprentice/collective.py).

After each optimizer step, rank 0 sends the full weights to the inference server over their group instead of
writing OUTPUT/weights/step_{n}: join once, then per step announce the update (its manifest), broadcast every
tensor and the trailer, and return once the server holds it staged. The orchestrator applies it when the step
it opens may use it, as it loads weights from disk in the filesystem mode (inference/backends.py).

    apprentice serve  POST /v1/weights/collective/join, then build the two-process group; per step POST
                      /v1/weights/collective/receive (the server receives in the background), broadcast, and
                      poll GET /v1/weights until it says staged (inference/collective.py)
    vLLM              through its dev-mode POST /collective_rpc on every worker (inference/vllm_worker.py):
                      count the workers (`apprentice_rank`), `apprentice_join` in a thread while the group of
                      1 + workers forms; per step `apprentice_receive` in a thread while broadcasting: its
                      answer says staged

A server that restarted (its group is gone) is joined again. Any other failure is a `BroadcastError`; the train
loop then publishes that step to disk instead (`send_weights`), so the run goes on.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import torch
import torch.distributed as dist
from transformers import PreTrainedModel

from apprentice import collective
from apprentice.config import Config
from apprentice.config.rl import weight_broadcast
from apprentice.errors import ApprenticeError
from apprentice.handoff.hfdir import full_state_dict
from apprentice.inference.launch import free_port

log = logging.getLogger("apprentice.trainer")

POLL_S = 0.01


class BroadcastError(ApprenticeError):
    """The server did not take a collective weight update."""


class WeightSender:
    """Rank 0's side: owns the group with the server at `base_url` (an OpenAI-style base URL ending in /v1), which
    is `apprentice serve` (`server = "builtin"`) or vLLM with apprentice's worker extension (`"vllm"`)."""

    def __init__(self, base_url: str, timeout_s: float = 120.0, server: str = "builtin",
                 headers: dict[str, str] | None = None) -> None:  # fmt: skip
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.server = server
        self.group: dist.ProcessGroupGloo | None = None
        self._http = httpx.Client(timeout=httpx.Timeout(timeout_s, connect=10.0), headers=headers)

    def send(self, state: dict[str, torch.Tensor], step: int) -> None:
        """Deliver `state` (full, unsharded weights) as the update of `step`; returns once the server staged it."""
        tensors = [(name, _on_wire(t)) for name, t in state.items()]
        entries = collective.manifest(tensors)
        try:
            receiving: _Call | None = None  # vLLM: the workers' receive call; apprentice serve receives by itself
            if self.server == "builtin":
                self._begin_builtin(entries, step)
            else:
                receiving = self._begin_vllm(entries, step)
            assert self.group is not None
            for _, tensor in tensors:
                collective.broadcast(self.group, tensor)
            collective.broadcast(self.group, collective.trailer(step, len(tensors)))
        except RuntimeError as e:  # a peer gone or timed out (gloo)
            self.group = None
            raise BroadcastError(f"weight update of step {step} to {self.base_url} failed: {e}") from e
        except httpx.HTTPError as e:  # no server (yet): the caller publishes to disk, which any server reads
            raise BroadcastError(f"the inference server at {self.base_url} is unreachable ({e})") from None
        if receiving is None:
            self._wait_staged(step)
        else:
            self._finish(receiving, f"receive step {step}")

    def _begin_builtin(self, entries: list[collective.ManifestEntry], step: int) -> None:
        """apprentice serve: POST the manifest; the server receives in the background (`_wait_staged` polls)."""
        body = {"step": step, "tensors": entries}
        for attempt in (0, 1):
            if self.group is None:
                self._join_builtin()
            response = self._http.post(f"{self.base_url}/weights/collective/receive", json=body)
            if response.status_code == 409 and attempt == 0 and "no_group" in response.text:
                self.group = None  # the server restarted (a resumed run, a crash): join again
                continue
            if response.status_code >= 400:
                raise BroadcastError(f"{self.base_url}/weights/collective/receive answered HTTP "
                                     f"{response.status_code}: {response.text[:500]}")  # fmt: skip
            return

    def _join_builtin(self) -> None:
        host = collective.local_address_towards(self.base_url)
        port = free_port()
        response = self._http.post(f"{self.base_url}/weights/collective/join",
                                   json={"host": host, "port": port, "timeout_s": self.timeout_s})  # fmt: skip
        if response.status_code >= 400:
            raise BroadcastError(f"{self.base_url}/weights/collective/join answered HTTP {response.status_code}: "
                                 f"{response.text[:500]}; is it `apprentice serve` (inference.backend = "
                                 f'"builtin")? Otherwise set trainer.weight_broadcast = "filesystem"')  # fmt: skip
        self.group = collective.open_group(host, port, collective.SENDER, self.timeout_s)

    def _begin_vllm(self, entries: list[collective.ManifestEntry], step: int) -> _Call:
        """vLLM: the workers' `apprentice_receive` blocks until the update is in, so it is called from a thread
        while this one broadcasts. A worker without the group (vLLM restarted) is joined first."""
        if self.group is not None:
            status = self._rpc("apprentice_status", [])
            if not all(isinstance(s, dict) and s.get("group") for s in status):
                self.group = None
        if self.group is None:
            workers = len(self._rpc("apprentice_rank", []))
            host = collective.local_address_towards(self.base_url)
            port = free_port()
            joining = _Call(self._rpc, "apprentice_join", [host, port, 1 + workers, self.timeout_s])
            try:
                self.group = collective.open_group(host, port, collective.SENDER, self.timeout_s, size=1 + workers)
            finally:
                self._finish(joining, "join")
        return _Call(self._rpc, "apprentice_receive", [step, json.dumps(entries)])

    def _rpc(self, method: str, args: list[Any]) -> list[Any]:
        root = self.base_url.removesuffix("/v1")
        response = self._http.post(f"{root}/collective_rpc", json={"method": method, "args": args})
        if response.status_code >= 400:
            hint = ("; is it vLLM started with --worker-extension-cls apprentice.inference.vllm_worker.WeightReloader "
                    "and VLLM_SERVER_DEV_MODE=1 (what `apprentice rl` starts)?" if response.status_code == 404 else "")  # fmt: skip
            raise BroadcastError(f"{root}/collective_rpc {method} answered HTTP {response.status_code}: "
                                 f"{response.text[:500]}{hint}")  # fmt: skip
        results = response.json().get("results")
        if not isinstance(results, list) or not results:
            raise BroadcastError(f"{root}/collective_rpc {method} answered no worker results: {response.text[:200]}")
        return results

    def _finish(self, call: _Call, what: str) -> None:
        call.join(self.timeout_s)
        if call.error is not None:
            self.group = None
            raise BroadcastError(f"the server failed to {what}: {call.error}")

    def _wait_staged(self, step: int) -> None:
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            status = self._http.get(f"{self.base_url}/weights").json()
            if status.get("staged") == step or (status.get("step") or 0) >= step:
                return
            if status.get("receiving") != step and status.get("receive_error"):
                self.group = None
                raise BroadcastError(f"the server failed to receive the update of step {step}: {status['receive_error']}")
            time.sleep(POLL_S)
        raise BroadcastError(f"the server did not stage the update of step {step} within {self.timeout_s:.0f} s")

    def close(self) -> None:
        self._http.close()
        self.group = None


class _Call:
    """A blocking HTTP call (one vLLM collective_rpc) run in a thread while the caller broadcasts."""

    def __init__(self, rpc: Callable[[str, list[Any]], list[Any]], method: str, args: list[Any]) -> None:
        self.error: str | None = None

        def run() -> None:
            try:
                rpc(method, args)
            except (BroadcastError, httpx.HTTPError) as e:
                self.error = str(e)

        self._thread = threading.Thread(target=run, name=f"apprentice-rpc-{method}", daemon=True)
        self._thread.start()

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self.error = f"no answer within {timeout_s:.0f} s"


def _on_wire(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor of a dtype the wire carries (float32 for any other)."""
    tensor = tensor.detach().to("cpu")
    if tensor.dtype not in collective.DTYPE_NAMES.values():
        tensor = tensor.float()
    return tensor.contiguous()


def send_weights(sender: WeightSender | None, model: PreTrainedModel, step: int) -> bool:
    """Collective mode, after step `step`: gather the full weights (every rank calls) and send them from rank 0
    (which holds `sender`). Whether the server staged them: False tells every rank to publish to disk instead."""
    state = full_state_dict(model)
    sent = [True]
    if sender is not None:
        try:
            sender.send(state, step)
        except BroadcastError as e:
            log.warning("%s; publishing the weights of step %d to OUTPUT/weights instead", e, step)
            sent[0] = False
    if dist.is_initialized():
        dist.broadcast_object_list(sent, src=0)
    return sent[0]


def weight_sender(cfg: Config) -> WeightSender | None:
    """Rank 0's sender when rl mode sends weights over the collective (None: they go through the filesystem)."""
    if cfg.mode != "rl" or weight_broadcast(cfg) != "collective":
        return None
    from apprentice.clients.session import endpoint_headers
    from apprentice.orchestrator.client import rollout_endpoint

    endpoint = rollout_endpoint(cfg)
    timeout_s = cfg.inference.startup_timeout_s if cfg.inference is not None else 600.0
    server = cfg.inference.backend if cfg.inference is not None else "builtin"
    return WeightSender(endpoint.base_url, timeout_s=timeout_s, server=server,
                        headers=endpoint_headers(endpoint, "orchestrator.student_endpoint"))  # fmt: skip
