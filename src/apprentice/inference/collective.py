"""`apprentice serve`'s receiving end of `trainer.weight_broadcast = "collective"` (the wire: apprentice/collective.py).

    POST /v1/weights/collective/join {"host", "port", "timeout_s"}    join the trainer's group (in the background;
                                                                     the trainer blocks until it has)
    POST /v1/weights/collective/receive {"step", "tensors": manifest} check the manifest against the served model,
                                                                     then receive the update in the background
    POST /v1/weights/apply {"step"}                                   serve the staged update of `step` from now on
    GET  /v1/weights                                                  also says "staged" (a complete update waiting)
                                                                     and "receive_error" (the last failed one)

An update is received into a copy of the served model (`copy.deepcopy`, made in the background after the
previous apply so the trainer does not wait for it; the served one keeps serving meanwhile) and only becomes `staged` once every tensor and the trailer have arrived; `apply` is then the same
reference swap as a reload from disk (batches in flight finish on the old weights). A receive that fails or
stops halfway leaves the served and the staged weights as they were, drops the group (the trainer joins
again), and 409s an apply of its step: never mixed weights. Who applies: the orchestrator (PolicySync), so
that each rollout is tagged with the weights that really sample it, as with weights from disk.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from apprentice import collective
from apprentice.inference.engine import BatchEngine
from apprentice.inference.guards import RequestError

log = logging.getLogger(__name__)


class JoinRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    timeout_s: float = Field(default=120.0, gt=0.0)


class ReceiveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    step: int = Field(ge=1, le=2**62)
    tensors: list[tuple[str, list[int], str]]


class ApplyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    step: int = Field(ge=1, le=2**62)


@dataclass
class _Staged:
    model: Any
    step: int


class Receiver:
    """Group membership, the update being received, and the newest complete one (see the module docstring)."""

    def __init__(self, engine: BatchEngine) -> None:
        self.engine = engine
        self.group: Any = None
        self.joining: threading.Thread | None = None
        self.receiving: int | None = None
        self.staged: _Staged | None = None
        self.error: str | None = None
        self.spare: Any = None
        self.preparing: threading.Thread | None = None
        self.lock = threading.Lock()

    def status(self) -> dict[str, Any]:
        """The collective fields of GET /v1/weights; none before a trainer has joined (filesystem mode)."""
        staged = self.staged
        if self.joining is None:
            return {}
        return {"staged": staged.step if staged else None, "receiving": self.receiving, "receive_error": self.error,
                "group": self.group is not None}  # fmt: skip

    def join(self, req: JoinRequest) -> None:
        with self.lock:
            if self.receiving is not None:
                raise RequestError(409, f"an update of step {self.receiving} is being received; join after it", "port")
            self.group = None

            def connect() -> None:
                try:
                    group = collective.open_group(req.host, req.port, collective.RECEIVER, req.timeout_s)
                except Exception as e:  # the trainer went away before it joined: it joins again next time
                    log.warning("could not join the trainer's weight group at %s:%d: %s", req.host, req.port, e)
                    return
                self.group = group
                self.prepare()

            self.joining = threading.Thread(target=connect, name="apprentice-weights-join", daemon=True)
            self.joining.start()

    def begin(self, req: ReceiveRequest) -> None:
        """Check the update against the served model and start receiving it (in a thread)."""
        with self.lock:
            if self.joining is not None:
                self.joining.join(timeout=60.0)  # the trainer's group constructor returned: ours is about to
            if self.group is None:
                raise RequestError(409, "no weight group: POST /v1/weights/collective/join first", "step",
                                   code="no_group")  # fmt: skip
            if self.receiving is not None:
                raise RequestError(409, f"an update of step {self.receiving} is still being received", "step")
            params = dict(self.engine.model.state_dict())
            for name, shape, dtype in req.tensors:
                if name not in params or list(params[name].shape) != shape or dtype not in collective.DTYPE_NAMES:
                    have = list(params[name].shape) if name in params else "no such tensor"
                    raise RequestError(400, f"update tensor {name} {shape} {dtype} does not fit the served model "
                                            f"({have}); collective updates carry weights of the same model only",
                                       "tensors", code="invalid_weights")  # fmt: skip
            self.receiving, self.error = req.step, None
            threading.Thread(target=self._receive, args=(req,), name="apprentice-weights-receive", daemon=True).start()

    def prepare(self) -> None:
        """Copy the served model into a spare in the background (after a join or an apply), so that the next
        update is received into it at once instead of waiting for a 4-bytes-per-parameter copy."""

        def copy_served() -> None:
            spare = copy.deepcopy(self.engine.model)
            with self.lock:
                self.spare = spare

        self.preparing = threading.Thread(target=copy_served, name="apprentice-weights-spare", daemon=True)
        self.preparing.start()

    def _staging_model(self) -> Any:
        """A model to receive into: the spare `prepare` made (used once), else a fresh copy of the served one."""
        if self.preparing is not None:
            self.preparing.join()
        with self.lock:
            spare, self.spare = self.spare, None
        return spare if spare is not None else copy.deepcopy(self.engine.model)

    def _receive(self, req: ReceiveRequest) -> None:
        group = self.group
        try:
            staging = self._staging_model()  # the served model keeps serving while this one fills
            targets = {name: t.data for name, t in staging.state_dict().items()}
            collective.receive_update(group, req.tensors, req.step, lambda name, shape, dtype: targets[name])
        except Exception as e:  # a trainer that died or stopped halfway: nothing of this update is served
            log.warning("weight update of step %d failed, keeping the current weights: %s", req.step, e)
            with self.lock:
                self.error, self.receiving, self.group = f"step {req.step}: {type(e).__name__}: {e}", None, None
            return
        with self.lock:
            self.staged, self.receiving = _Staged(staging, req.step), None

    def apply(self, step: int) -> float:
        """Serve the staged update of `step`, or the newer one that replaced it (the trainer may send step n+1
        while the orchestrator, asking for n, waits for an evaluation); the seconds the swap took. The step
        served is in `engine.weights`."""
        started = time.perf_counter()
        with self.lock:
            staged = self.staged
            if staged is None or staged.step < step:
                have = f"step {staged.step}" if staged else "none"
                raise RequestError(409, f"no complete update of step {step} or newer is staged (staged: {have}; "
                                        f"last error: {self.error})", "step", code="not_staged")  # fmt: skip
            self.staged = None
        self.engine.swap(staged.model, step=staged.step, path=f"collective:step_{staged.step}")
        self.prepare()
        return time.perf_counter() - started


def register_collective(app: FastAPI, engine: BatchEngine) -> Receiver:
    """Add the collective endpoints to `app`; the returned Receiver also answers GET /v1/weights' extra fields."""
    receiver = Receiver(engine)

    @app.post("/v1/weights/collective/join")
    async def join(request: Request) -> JSONResponse:
        receiver.join(JoinRequest.model_validate(await request.json()))
        return JSONResponse({"joining": True})

    @app.post("/v1/weights/collective/receive")
    async def receive(request: Request) -> JSONResponse:
        req = ReceiveRequest.model_validate(await request.json())
        await asyncio.to_thread(receiver.begin, req)  # may wait a moment for the group to finish joining
        return JSONResponse({"receiving": req.step})

    @app.post("/v1/weights/apply")
    async def apply(request: Request) -> JSONResponse:
        req = ApplyRequest.model_validate(await request.json())
        seconds = receiver.apply(req.step)
        return JSONResponse({**engine.weights, "reload_s": seconds})

    return receiver
