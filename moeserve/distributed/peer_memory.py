"""Buffers every rank of a group can store into directly: each rank's buffer mapped into every
peer's process, so that dispatch/combine kernels write rows straight into the receiving rank's
memory instead of handing them to a collective (DeepEP's intranode design; dispatch.py's "peer"
transport), plus the device barrier that orders those stores (kernels/peer_sync.py).

CUDA: one torch allocation per rank shared through CUDA IPC (torch.multiprocessing's CUDA tensor
reduction: cudaIpcGetMemHandle, opened by each peer with peer access enabled); a kernel on this
GPU then stores over NVLink (or PCIe) into the peer's HBM. Each peer opens the handle on its own
GPU (torch would open it on the exporter's, creating a CUDA context, ~0.5 GB, on every peer GPU
of every rank). It also maps several processes on one GPU, which tests use on a one-GPU machine
(torch's symmetric memory refuses that layout).
CPU: a file in /dev/shm that every rank maps shared, so that gloo ranks run the same protocol.

All ranks of the group must be on one host (checked at start). Each rank's buffer:
    [0, 8 R)                the barrier's int64 flags, one per rank
    then each named region, 256-byte aligned, in the order given
Creating a PeerBuffers is a collective over the group (every rank, same regions, not while a
CUDA graph is being captured).
"""

from __future__ import annotations

import inspect
import os
import socket
import tempfile
import uuid

import torch
import torch.distributed as dist

from moeserve.kernels.peer_sync import peer_barrier

DEFAULT_TIMEOUT_S = 300.0  # the process groups' default deadline (groups.py)
ALIGN = 256


class PeerTimeout(RuntimeError):
    """A rank waited past the deadline at a peer barrier: a peer is dead or stuck."""


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def _on_device(rebuild, args: tuple, index: int) -> tuple:
    """torch's CUDA-tensor rebuild arguments, changed to open the IPC handle on GPU `index` (this
    rank's): cudaIpcOpenMemHandle maps the peer's memory into the current device's context, with
    peer access enabled lazily, as DeepEP and vLLM's custom all-reduce open theirs. The tensor then
    says it is on this GPU, which is where its address is valid. No IPC event to wait on: the
    exporter synchronized before it shared the handle."""
    names = list(inspect.signature(rebuild).parameters)
    args = list(args)
    args[names.index("storage_device")] = index
    args[names.index("event_sync_required")] = False
    return tuple(args)


class PeerBuffers:
    """regions: name -> bytes. local(name) is this rank's region; peer_views(name)[r] is rank r's
    region as this process maps it; table(name) holds their addresses (int64 [R], on the device)
    for kernels. barrier() is the device barrier (or, for the torch path on CPU, the group's)."""

    def __init__(self, group: dist.ProcessGroup, regions: dict[str, int], device: torch.device | str,
                 timeout_s: float = DEFAULT_TIMEOUT_S):
        self.group, self.device, self.timeout_s = group, torch.device(device), timeout_s
        self.rank, self.num_ranks = dist.get_rank(group), dist.get_world_size(group)
        self.offsets, size = {}, _align(8 * self.num_ranks)
        for name, nbytes in regions.items():
            self.offsets[name], size = (size, nbytes), size + _align(nbytes)
        self.nbytes = size
        self._path = None
        if self.device.type == "cuda":
            from torch.multiprocessing.reductions import reduce_tensor
            self.buffer = torch.zeros(size, dtype=torch.uint8, device=self.device)
            torch.cuda.synchronize(self.device)  # the zeros are written before any peer maps them
            handle = reduce_tensor(self.buffer)
        else:
            self._path = os.path.join(_shm_dir(), f"moeserve-peer-{uuid.uuid4().hex}-{self.rank}")
            self.buffer = torch.from_file(self._path, shared=True, size=size, dtype=torch.uint8)
            handle = self._path
        shared = [None] * self.num_ranks
        dist.all_gather_object(shared, (socket.gethostname(), handle), group=group)
        hosts = sorted({host for host, _ in shared})
        if len(hosts) > 1:
            self.close()
            raise ValueError(f"peer memory needs every rank of the group on one host; they are on {hosts}")
        try:
            self.peers = [self.buffer if r == self.rank else self._open(r, h) for r, (_, h) in enumerate(shared)]
        finally:
            dist.barrier(group=group)  # every rank has mapped every file: the names can go
            self.close()
        self.flag_ptrs = self._addresses(0)
        self.epoch = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.status = torch.zeros(1, dtype=torch.int64, device=self.device)
        self._status_seen = torch.zeros(1, dtype=torch.int64, pin_memory=self.device.type == "cuda")
        self._tables: dict[str, torch.Tensor] = {}

    def _open(self, peer: int, handle) -> torch.Tensor:
        if self.device.type != "cuda":
            return torch.from_file(handle, shared=True, size=self.nbytes, dtype=torch.uint8)
        rebuild, args = handle
        try:
            return rebuild(*_on_device(rebuild, args, self.device.index))
        except RuntimeError as e:
            raise RuntimeError(f"rank {self.rank} cannot map rank {peer}'s peer-memory buffer on {self.device} (no "
                               f"peer access between their GPUs?); use the collective low-latency transport") from e

    def close(self) -> None:
        """Remove this rank's shared-memory file name (CPU); the mappings stay valid."""
        if self._path is not None:
            try:
                os.unlink(self._path)
            except FileNotFoundError:
                pass
            self._path = None

    def release(self) -> None:
        """Unmap the peers' buffers; a collective (every rank, after its last store). On CUDA a process
        that exits while a peer still maps its memory makes torch warn that the producer ended before
        its shared tensors were released: after the barrier no peer maps this rank's buffer."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.peers = [self.buffer]
        self._tables.clear()
        dist.barrier(group=self.group)

    def _addresses(self, offset: int) -> torch.Tensor:
        return torch.tensor([p.data_ptr() + offset for p in self.peers], dtype=torch.int64, device=self.device)

    def local(self, name: str) -> torch.Tensor:
        offset, nbytes = self.offsets[name]
        return self.buffer[offset:offset + nbytes]

    def peer_views(self, name: str) -> list[torch.Tensor]:
        offset, nbytes = self.offsets[name]
        return [p[offset:offset + nbytes] for p in self.peers]

    def table(self, name: str) -> torch.Tensor:
        if name not in self._tables:
            self._tables[name] = self._addresses(self.offsets[name][0])
        return self._tables[name]

    def barrier(self, kernel: bool = True) -> None:
        """Wait until every rank has reached its own barrier; stores made before it into any rank's
        buffer are visible to that rank after it. kernel=False (CPU without the Triton interpreter):
        the group's host barrier instead, which orders the stores of the torch path as well."""
        if kernel:
            peer_barrier(self.flag_ptrs, self.epoch, self.status, self.rank, self.timeout_s)
        else:
            dist.barrier(group=self.group)

    def check(self) -> None:
        """Raise PeerTimeout if a barrier gave up waiting. On CUDA this reads the value copied at
        the previous check (no host sync): a timeout surfaces one check late."""
        if self.status.is_cuda:
            late = int(self._status_seen[0])
            self._status_seen.copy_(self.status, non_blocking=True)
        else:
            late = int(self.status[0])
        if late:
            raise PeerTimeout(f"rank {self.rank}: a peer barrier waited more than {self.timeout_s:g}s for rank "
                              f"{late - 1}; its outputs since are not valid")
