"""The wire of `trainer.weight_broadcast = "collective"`: weights from the trainer to the inference server over a
torch.distributed group, with no file per step.

    rank 0      the trainer's rank 0 (the sender; hosts the group's TCPStore)
    rank 1..n   the inference server's processes (the receivers): `apprentice serve` is one; vLLM is one per
                worker (GPU), each receiving every tensor whole (its own weight loader shards it)

The group is its own `ProcessGroupGloo` built from a `TCPStore`, never the default process group: the trainer's
ranks already have one (FSDP2), and the server has none. One update is, in order:

    the manifest        [[name, shape, dtype], ...] sent over HTTP first (the server checks it against its model)
    each tensor         one broadcast per tensor, in manifest order, from rank 0
    the trailer         int64 [step, number of tensors]: the receiver swaps nothing in before it has arrived

A receiver fills a staging copy of its model; only a complete update (every tensor, then a trailer that
matches) becomes servable, so a failed or partial update never mixes weights.
"""

from __future__ import annotations

import datetime
import socket
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

import torch
import torch.distributed as dist

SENDER, RECEIVER = 0, 1

DTYPE_NAMES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

ManifestEntry = tuple[str, list[int], str]
"""(parameter name, shape, dtype name) of one tensor of an update."""


def open_group(host: str, port: int, rank: int, timeout_s: float, size: int = 2) -> dist.ProcessGroupGloo:
    """The group of `size` processes; blocks until every one has joined (or `timeout_s` passes: RuntimeError).
    Rank 0 hosts the store on `port`; every collective on the group then fails after `timeout_s` without its peers."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, size, rank == SENDER, timeout=timeout, wait_for_workers=False)
    return dist.ProcessGroupGloo(store, rank, size, timeout)


def manifest(tensors: Iterable[tuple[str, torch.Tensor]]) -> list[ManifestEntry]:
    return [(name, list(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in tensors]


def broadcast(group: dist.ProcessGroupGloo, tensor: torch.Tensor) -> None:
    """Rank 0's `tensor` into every rank's `tensor` (same shape and dtype, contiguous), in place."""
    options = dist.BroadcastOptions()
    options.rootRank = SENDER
    group.broadcast([tensor], options).wait()  # type: ignore[attr-defined]  # bound from C++, missing in the stubs


def trailer(step: int, count: int) -> torch.Tensor:
    return torch.tensor([step, count], dtype=torch.int64)


def receive_update(group: dist.ProcessGroupGloo, entries: list[ManifestEntry], step: int,
                   target: Callable[[str, list[int], torch.dtype], torch.Tensor]) -> None:  # fmt: skip
    """A receiver's side of one update: each tensor of `entries` into `target(name, shape, wire dtype)` (or into a
    host buffer copied there when that tensor is not a contiguous CPU tensor of the wire dtype), then the
    trailer. RuntimeError when the trailer does not close this update; the sender's errors (a peer gone, a timeout)
    propagate. Either way the caller serves nothing of it."""
    for name, shape, dtype in entries:
        wire_dtype = DTYPE_NAMES[dtype]
        into = target(name, shape, wire_dtype)
        if into.dtype == wire_dtype and into.is_contiguous() and into.device.type == "cpu":
            broadcast(group, into)
        else:  # another dtype or device: receive on the host, then cast/copy
            buffer = torch.empty(shape, dtype=wire_dtype)
            broadcast(group, buffer)
            into.copy_(buffer)
    tail = trailer(0, 0)
    broadcast(group, tail)
    if tail.tolist() != [step, len(entries)]:
        raise RuntimeError(f"trailer {tail.tolist()} does not close step {step} ({len(entries)} tensors)")


def local_address_towards(base_url: str) -> str:
    """This machine's address as the server at `base_url` reaches it (loopback for a local server)."""
    host = urlsplit(base_url).hostname or "127.0.0.1"
    if host in ("localhost", "127.0.0.1", "::1"):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # no packet is sent: routing only
        probe.connect((host, 9))
        return str(probe.getsockname()[0])
