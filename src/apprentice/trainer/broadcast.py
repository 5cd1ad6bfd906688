"""The trainer's sending end of `trainer.weight_broadcast = "collective"` (the wire: apprentice/collective.py).

After each optimizer step, rank 0 sends the full weights to the inference server over their two-process group
instead of writing OUTPUT/weights/step_{n}: join once (POST /v1/weights/collective/join, then build the group),
then per step POST /v1/weights/collective/receive with the manifest, broadcast every tensor and the trailer,
and wait until the server reports the update staged. The orchestrator applies it (POST /v1/weights/apply)
when the step it opens may use it, as it loads weights from disk in the filesystem mode.

A server that restarted (its group is gone: 409 no_group) is joined again. Any other failure is a
`BroadcastError`; the train loop then publishes that step to disk instead (`send_weights`), so the run goes on.
"""

from __future__ import annotations

import logging
import time

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
    """Rank 0's side: owns the group with the server at `base_url` (an OpenAI-style base URL ending in /v1)."""

    def __init__(self, base_url: str, timeout_s: float = 120.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.group: dist.ProcessGroupGloo | None = None
        self._http = httpx.Client(timeout=httpx.Timeout(timeout_s, connect=10.0))

    def send(self, state: dict[str, torch.Tensor], step: int) -> None:
        """Deliver `state` (full, unsharded weights) as the update of `step`; returns once the server staged it."""
        tensors = [(name, _on_wire(t)) for name, t in state.items()]
        body = {"step": step, "tensors": collective.manifest(tensors)}
        for attempt in (0, 1):
            try:
                if self.group is None:
                    self._join()
                response = self._http.post(f"{self.base_url}/weights/collective/receive", json=body)
            except httpx.HTTPError as e:  # no server (yet): the caller publishes to disk, which any server reads
                raise BroadcastError(f"the inference server at {self.base_url} is unreachable ({e})") from None
            if response.status_code == 409 and attempt == 0 and "no_group" in response.text:
                self.group = None  # the server restarted (a resumed run, a crash): join again
                continue
            if response.status_code >= 400:
                raise BroadcastError(f"{self.base_url}/weights/collective/receive answered HTTP "
                                     f"{response.status_code}: {response.text[:500]}")  # fmt: skip
            break
        assert self.group is not None
        try:
            for _, tensor in tensors:
                collective.broadcast(self.group, tensor)
            collective.broadcast(self.group, collective.trailer(step, len(tensors)))
        except RuntimeError as e:
            self.group = None
            raise BroadcastError(f"weight update of step {step} to {self.base_url} failed: {e}") from e
        self._wait_staged(step)

    def _join(self) -> None:
        host = collective.local_address_towards(self.base_url)
        port = free_port()
        response = self._http.post(f"{self.base_url}/weights/collective/join",
                                   json={"host": host, "port": port, "timeout_s": self.timeout_s})  # fmt: skip
        if response.status_code >= 400:
            raise BroadcastError(f"{self.base_url}/weights/collective/join answered HTTP {response.status_code}: "
                                 f"{response.text[:500]}; is it `apprentice serve` (inference.backend = "
                                 f'"builtin")? Otherwise set trainer.weight_broadcast = "filesystem"')  # fmt: skip
        self.group = collective.open_group(host, port, collective.SENDER, self.timeout_s)

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
    from apprentice.orchestrator.client import rollout_endpoint

    timeout_s = cfg.inference.startup_timeout_s if cfg.inference is not None else 600.0
    return WeightSender(rollout_endpoint(cfg).base_url, timeout_s=timeout_s)
