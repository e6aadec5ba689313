"""Moving rows between the ranks that own them and the ranks that need them (fetch placement).

One exchange per step, TorchRec-style: each rank sends the owners the keys of the rows it needs
(each once; counts first, then keys, both by ``all_to_all_single``), owners resolve the keys to
their own rows and answer with them, and after backward the gradients travel the same route in
reverse and are summed at the owner. The row transfer can be started asynchronously (prefetch)
and waited for later.

Counters record what crossed the wire: a rank's traffic to itself is a local copy and not counted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch
import torch.distributed as dist

from flora_train import dist as fdist


@dataclass
class CommCounters:
    rows_fetched: int = 0  # unique rows a rank asked for in its steps (its own included)
    rows_remote: int = 0  # of those, rows owned by another rank
    rows_served: int = 0  # rows this rank sent to other ranks
    bytes_sent: int = 0
    bytes_received: int = 0

    def add(self, other: "CommCounters") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class Route:
    """Where one rank's requested rows live and what the other ranks asked of it."""

    order: torch.Tensor  # request positions sorted by owner
    send_counts: list[int]  # requests this rank sends to each owner
    recv_counts: list[int]  # requests each rank sends to this one
    served_rows: torch.Tensor  # this rank's table rows the requests name, in arrival order


@dataclass
class PendingRows:
    route: Route
    buffer: torch.Tensor
    work: object | None = None
    _done: bool = field(default=False, repr=False)

    def wait(self) -> torch.Tensor:
        """The requested rows ``[n, D]`` in the order they were requested."""
        if not self._done:
            if self.work is not None:
                self.work.wait()  # type: ignore[attr-defined]
            self._done = True
        out = torch.empty_like(self.buffer)
        out[self.route.order.to(out.device)] = self.buffer
        return out


class RowExchange:
    def __init__(self, group: dist.ProcessGroup | None, row_size: int, device: torch.device) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.row_size = row_size
        # Rows travel on the compute device where the group has a backend for it (NCCL on GPUs);
        # the small int64 counts and ids always travel on the host (gloo), where they are made.
        self.wire_device = device if device.type != "cpu" and fdist.serves(group, device.type) else torch.device("cpu")
        self.counters = CommCounters()

    def _remote(self, counts: list[int]) -> int:
        return sum(c for r, c in enumerate(counts) if r != self.rank)

    def route(self, owners: torch.Tensor, keys: torch.Tensor,
              resolve: Callable[[torch.Tensor], torch.Tensor] = lambda rows: rows) -> Route:
        """Sends each owner the keys of the rows this rank needs (``owners[i]`` holds ``keys[i]``;
        each at most once); each owner turns the keys it receives into its table rows with
        ``resolve`` (the identity when keys are row numbers). Collective: every rank calls it in
        the same order."""
        order = torch.argsort(owners, stable=True)
        send_counts = torch.bincount(owners, minlength=self.world).to(torch.int64)
        recv_counts = torch.empty(self.world, dtype=torch.int64)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send, recv = send_counts.tolist(), recv_counts.tolist()
        asked = torch.empty(sum(recv), dtype=torch.int64)
        dist.all_to_all_single(asked, keys[order].contiguous(), recv, send, group=self.group)
        served = resolve(asked)
        self.counters.rows_fetched += int(owners.numel())
        self.counters.rows_remote += self._remote(send)
        return Route(order, send, recv, served)

    def send_rows(self, route: Route, gather: Callable[[torch.Tensor], torch.Tensor], async_op: bool = False) -> PendingRows:
        """Owners answer the requests with ``gather(served_rows)``; ``wait()`` on the result gives them."""
        values = gather(route.served_rows).to(self.wire_device, torch.float32).contiguous()
        buffer = torch.empty(sum(route.send_counts), self.row_size, dtype=torch.float32, device=self.wire_device)
        work = dist.all_to_all_single(buffer, values, route.send_counts, route.recv_counts, group=self.group, async_op=async_op)
        row_bytes = self.row_size * 4
        self.counters.rows_served += self._remote(route.recv_counts)
        self.counters.bytes_sent += self._remote(route.recv_counts) * row_bytes
        self.counters.bytes_received += self._remote(route.send_counts) * row_bytes
        return PendingRows(route, buffer, work)

    def send_grads(self, route: Route, grads: torch.Tensor) -> torch.Tensor:
        """Gradients of the requested rows (request order) back to their owners; returns, at each
        owner, one gradient per served request (``route.served_rows`` order) to be summed."""
        src = grads.detach()[route.order.to(grads.device)].to(self.wire_device, torch.float32).contiguous()
        out = torch.empty(sum(route.recv_counts), self.row_size, dtype=torch.float32, device=self.wire_device)
        dist.all_to_all_single(out, src, route.recv_counts, route.send_counts, group=self.group)
        row_bytes = self.row_size * 4
        self.counters.bytes_sent += self._remote(route.send_counts) * row_bytes
        self.counters.bytes_received += self._remote(route.recv_counts) * row_bytes
        return out
