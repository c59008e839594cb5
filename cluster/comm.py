"""Tensor-parallel collectives behind the TPGroup protocol (rank, size, all_reduce, all_gather).

Two implementations:

- GlooGroup wraps a torch.distributed process group (gloo on CPU, nccl on CUDA). It is the
  general path: any placement, any architecture.
- ShmGroup serves ranks that share one host through a file in /dev/shm. A gloo all_reduce of a
  hidden-state row costs 1.2-1.7 ms here, more than a layer's math; a shared-memory exchange
  costs tens of microseconds, so Megatron TP on CPU only pays off through this path.

Callers pick: ShmGroup when every rank of the TP group is on one host and shm_supported() is
true, else GlooGroup.
"""

from __future__ import annotations

import math
import mmap
import os
import platform
import secrets
import time

import torch
import torch.distributed as dist
from torch import Tensor

SHM_DIR = "/dev/shm"
SEGMENT_PREFIX = "shardserve-comm-"

# Layout of a segment, in 64-byte cache lines so no two ranks ever write the same line:
#   line 0            global header: magic, world, max_elems, aborted_by (rank + 1, 0 = none)
#   line 1 + r        rank r's control line: seq (last finished publish), meta[parity 0], meta[parity 1]
#   data              2 parities x world slots, each max_elems * _SLOT_ITEMSIZE bytes (64-aligned)
_LINE_BYTES = 64
_LINE_WORDS = _LINE_BYTES // 8
_MAGIC = 0x5348_4152_4453_4D31  # "SHARDSM1"
_HDR_MAGIC, _HDR_WORLD, _HDR_MAX_ELEMS, _HDR_ABORTED_BY = 0, 1, 2, 3
_CTL_SEQ, _CTL_META = 0, 1  # meta for parity p lives at word _CTL_META + p
_SLOT_ITEMSIZE = 4  # widest supported dtype (float32)
_MAX_CACHED_VIEWS = 64  # distinct (dtype, numel) slot views kept per group

_DTYPE_CODES = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}
_DTYPE_NAMES = {code: str(dtype).removeprefix("torch.") for dtype, code in _DTYPE_CODES.items()}
_OP_ALL_REDUCE, _OP_ALL_GATHER = 1, 2
_OP_NAMES = {_OP_ALL_REDUCE: "all_reduce", _OP_ALL_GATHER: "all_gather"}


def shm_supported() -> bool:
    """True where ShmGroup's memory-ordering assumption (x86 TSO) holds and /dev/shm exists."""
    return platform.machine().lower() in ("x86_64", "amd64") and os.path.isdir(SHM_DIR)


class GlooGroup:
    """TPGroup over a torch.distributed process group (gloo or nccl).

    all_reduce works in place on a contiguous version of x and returns it.
    """

    def __init__(self, group: dist.ProcessGroup | None, rank: int, size: int):
        group_rank, group_size = dist.get_rank(group), dist.get_world_size(group)
        if (rank, size) != (group_rank, group_size):
            raise ValueError(
                f"GlooGroup: rank/size given as {rank}/{size} but the process group says "
                f"{group_rank}/{group_size}"
            )
        self.group = group
        self.rank = rank
        self.size = size
        # Decided on the first all_gather: older gloo builds lack all_gather_into_tensor.
        self._gather_into_tensor: bool | None = None

    def all_reduce(self, x: Tensor) -> Tensor:
        x = x.contiguous()
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: Tensor, dim: int = -1) -> Tensor:
        x = x.contiguous()
        if self._gather_into_tensor is not False:
            # Flat in, flat out: every backend accepts the concatenated (world * numel,) form.
            flat = torch.empty(self.size * x.numel(), dtype=x.dtype, device=x.device)
            gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
            try:
                gather_single(flat, x.view(-1), group=self.group)
                self._gather_into_tensor = True
                return torch.cat(flat.view(self.size, *x.shape).unbind(0), dim=dim)
            except (RuntimeError, NotImplementedError):
                if self._gather_into_tensor:  # worked before: a real failure
                    raise
                self._gather_into_tensor = False
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=dim)


class ShmGroup:
    """TPGroup for ranks on one host, exchanging through a /dev/shm segment.

    Each call: copy x into my slot of the current parity buffer, publish my sequence number,
    wait until every rank has published it, then read all slots. all_reduce sums the slots in
    rank order 0..world-1 on every rank, so every rank gets bitwise-identical results
    (float16/bfloat16 with world > 2 accumulate in float32 and round once). Inputs larger than
    max_elems are processed in chunks of max_elems, one exchange each.

    Why one flag per rank and two parity buffers suffice (no second barrier per call):
    call k uses parity k % 2 and publishes seq = k. A rank can only start call k + 2, which
    overwrites the parity-(k % 2) slots, after seeing every peer's seq >= k + 1; a peer
    publishes k + 1 only after it has finished reading the slots of call k. So a buffer is never
    overwritten while someone still reads it, and a fast rank runs at most one call ahead,
    writing the other parity. The per-call shape/dtype/op check word is double-buffered the
    same way.

    Memory ordering: a writer stores its data, then its meta word, then its seq; a reader loads
    the seq, then the data. This relies on x86-64 TSO (stores become visible in program order,
    loads are not reordered with older loads), so no fences are needed. (Slots are far below the
    sizes where copies switch to non-temporal stores, and glibc fences those anyway.) On other
    architectures shm_supported() is false and the constructor refuses: use GlooGroup there.

    Waiting spins for `spin_checks` flag reads (~10 us), then yields the CPU (os.sched_yield) and
    after ~2 ms sleeps in growing steps up to 250 us, so ranks sharing a core (tp=3 on 2 cores,
    or two ranks the scheduler put on one core) hand it to each other instead of livelocking.
    Long spinning hurts exactly there; a yield with nothing else runnable returns in ~1 us.
    After `timeout_s` it raises RuntimeError naming the missing rank and marks the segment
    aborted, so peers waiting on the same call fail fast instead of waiting out their own
    timeout. A group that raised is broken: later calls raise at once.
    """

    def __init__(
        self,
        name: str,
        rank: int,
        world: int,
        max_elems: int,
        *,
        timeout_s: float = 60.0,
        spin_checks: int = 200,
    ):
        if not shm_supported():
            raise RuntimeError(
                f"ShmGroup needs x86-64 store ordering and {SHM_DIR}; this machine is "
                f"{platform.machine()!r}: use GlooGroup"
            )
        if not 0 <= rank < world:
            raise ValueError(f"ShmGroup: rank must be in [0, {world}), got {rank}")
        if timeout_s <= 0:
            raise ValueError(f"ShmGroup: timeout_s must be > 0, got {timeout_s}")
        self.name = name
        self.rank = rank
        self.size = world
        self.max_elems = max_elems
        self.timeout_s = timeout_s
        self.spin_checks = spin_checks
        self._seq = 0
        self._broken: str | None = None

        path = _segment_path(name)
        expected = _segment_bytes(world, max_elems)
        fd = os.open(path, os.O_RDWR)
        try:
            actual = os.fstat(fd).st_size
            if actual != expected:
                raise ValueError(
                    f"ShmGroup: segment {name} has {actual} bytes, expected {expected} for "
                    f"world={world}, max_elems={max_elems}"
                )
            self._mmap = mmap.mmap(fd, expected)
        finally:
            os.close(fd)
        self._words = memoryview(self._mmap).cast("q")  # int64 view for header/control words
        header = tuple(self._words[_HDR_MAGIC : _HDR_MAX_ELEMS + 1])
        if header != (_MAGIC, world, max_elems):
            self.close()
            raise ValueError(
                f"ShmGroup: segment {name} header (magic, world, max_elems) = "
                f"({header[0]:#x}, {header[1]}, {header[2]}), expected "
                f"({_MAGIC:#x}, {world}, {max_elems})"
            )
        # Word index of each rank's seq word; my meta words follow mine.
        self._seq_index = [(1 + r) * _LINE_WORDS + _CTL_SEQ for r in range(world)]
        self._data = torch.frombuffer(self._mmap, dtype=torch.uint8)[_data_offset(world) :]
        self._slot_bytes = _slot_bytes(max_elems)
        # (dtype, numel) -> per parity, every rank's slot viewed as numel elements of dtype.
        # Slicing costs ~1 us a view; hidden-state sizes repeat step after step, so cache them.
        self._slot_views: dict[tuple[torch.dtype, int], tuple[list[Tensor], list[Tensor]]] = {}

    supported = staticmethod(shm_supported)

    # ---- segment lifecycle -------------------------------------------------------------------

    @staticmethod
    def create_segment(world: int, max_elems: int) -> str:
        """Create a zeroed segment for `world` ranks and up to `max_elems` elements per call.

        Returns its name; the creator must later call unlink_segment(name). It may do so as soon
        as every rank has opened its ShmGroup (open mappings survive the unlink), which leaves
        nothing behind even if a process dies later.
        """
        if world < 1:
            raise ValueError(f"create_segment: world must be >= 1, got {world}")
        if max_elems < 1:
            raise ValueError(f"create_segment: max_elems must be >= 1, got {max_elems}")
        if not shm_supported():
            raise RuntimeError(f"create_segment: shared memory not supported on {platform.machine()!r}")
        name = f"{SEGMENT_PREFIX}{os.getpid()}-{secrets.token_hex(6)}"
        size = _segment_bytes(world, max_elems)
        fd = os.open(_segment_path(name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, size)  # zero-filled: every seq starts at 0
            with mmap.mmap(fd, _LINE_BYTES) as header:
                words = memoryview(header).cast("q")
                words[_HDR_WORLD] = world
                words[_HDR_MAX_ELEMS] = max_elems
                words[_HDR_MAGIC] = _MAGIC
                words.release()
        except BaseException:
            os.unlink(_segment_path(name))
            raise
        finally:
            os.close(fd)
        return name

    @staticmethod
    def unlink_segment(name: str) -> None:
        """Remove the segment's file (idempotent). Mappings already open stay valid."""
        try:
            os.unlink(_segment_path(name))
        except FileNotFoundError:
            pass

    def close(self) -> None:
        """Unmap the segment (idempotent). Does not unlink: that is the creator's job."""
        if self._mmap is None:
            return
        self._slot_views.clear()
        self._data = None
        self._words.release()
        try:
            self._mmap.close()
        except BufferError:
            pass  # a view is still alive (e.g. held by a traceback); unmapped when it dies
        self._mmap = None
        self._broken = self._broken or "closed"

    def __enter__(self) -> "ShmGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- collectives -------------------------------------------------------------------------

    def all_reduce(self, x: Tensor) -> Tensor:
        """Sum of x over ranks (a new tensor, same shape and dtype)."""
        flat = self._check_input(x, "all_reduce")
        n = flat.numel()
        meta = _pack_meta(_OP_ALL_REDUCE, x.dtype, n)
        if n <= self.max_elems:
            return self._reduce(self._exchange(flat, meta), x.dtype).view_as(x)
        out = torch.empty(n, dtype=x.dtype)
        for start in range(0, n, self.max_elems):
            chunk = flat[start : start + self.max_elems]
            out[start : start + chunk.numel()] = self._reduce(self._exchange(chunk, meta), x.dtype)
        return out.view_as(x)

    def all_gather(self, x: Tensor, dim: int = -1) -> Tensor:
        """Every rank's x (all of the same shape) concatenated in rank order along dim."""
        flat = self._check_input(x, "all_gather")
        n = flat.numel()
        meta = _pack_meta(_OP_ALL_GATHER, x.dtype, n)
        if n <= self.max_elems:
            parts = self._exchange(flat, meta)
            return torch.cat([part.view_as(x) for part in parts], dim=dim)
        gathered = torch.empty((self.size, n), dtype=x.dtype)  # (world, numel)
        for start in range(0, n, self.max_elems):
            chunk = flat[start : start + self.max_elems]
            for r, part in enumerate(self._exchange(chunk, meta)):
                gathered[r, start : start + chunk.numel()] = part
        return torch.cat([row.view_as(x) for row in gathered], dim=dim)

    # ---- internals ---------------------------------------------------------------------------

    def _check_input(self, x: Tensor, op: str) -> Tensor:
        if self._broken is not None:
            raise RuntimeError(f"ShmGroup rank {self.rank}: {op} on a broken group ({self._broken})")
        if x.dtype not in _DTYPE_CODES:
            raise ValueError(
                f"ShmGroup.{op}: dtype {x.dtype} not supported (float32, bfloat16, float16)"
            )
        if not x.is_cpu:
            raise ValueError(f"ShmGroup.{op}: tensor must be on the CPU, got {x.device}")
        return x if x.dim() == 1 else x.reshape(-1)

    def _slots(self, dtype: torch.dtype, numel: int, parity: int) -> list[Tensor]:
        """Each rank's slot of one parity, viewed as numel elements of dtype."""
        views = self._slot_views.get((dtype, numel))
        if views is None:
            if len(self._slot_views) >= _MAX_CACHED_VIEWS:
                self._slot_views.clear()
            nbytes = numel * dtype.itemsize
            views = tuple(
                [
                    self._data[(p * self.size + r) * self._slot_bytes :][:nbytes].view(dtype)
                    for r in range(self.size)
                ]
                for p in range(2)
            )
            self._slot_views[(dtype, numel)] = views
        return views[parity]

    def _exchange(self, flat: Tensor, meta: int) -> list[Tensor]:
        """One collective round: publish flat (<= max_elems), wait for all, return every slot.

        The returned views stay valid until this rank's next exchange.
        """
        n = flat.numel()
        self._seq += 1
        seq, parity = self._seq, self._seq & 1
        slots = self._slots(flat.dtype, n, parity)
        slots[self.rank].copy_(flat)
        words = self._words
        my_seq = self._seq_index[self.rank]
        words[my_seq + _CTL_META + parity] = meta
        words[my_seq] = seq  # publish: data and meta stores are visible before this one (TSO)
        for r in range(self.size):
            if words[self._seq_index[r]] < seq:
                self._wait(r, seq)
        for r in range(self.size):
            peer_meta = words[self._seq_index[r] + _CTL_META + parity]
            if peer_meta != meta:
                self._fail(
                    ValueError,
                    f"collective mismatch on call {seq}: rank {self.rank} called "
                    f"{_describe_meta(meta)} but rank {r} called {_describe_meta(peer_meta)}",
                )
        return slots

    def _reduce(self, parts: list[Tensor], dtype: torch.dtype) -> Tensor:
        # Fixed rank order on every rank => bitwise-identical results everywhere.
        if len(parts) == 1:
            return parts[0].clone()
        if len(parts) == 2 or dtype == torch.float32:
            acc = torch.add(parts[0], parts[1])
            for part in parts[2:]:
                acc.add_(part)
            return acc
        acc = parts[0].float()  # half types over > 2 ranks: accumulate in float32, round once
        for part in parts[1:]:
            acc.add_(part)
        return acc.to(dtype)

    def _wait(self, peer: int, seq: int) -> None:
        words, index = self._words, self._seq_index[peer]
        for _ in range(self.spin_checks):
            if words[index] >= seq:
                return
        start = time.monotonic()
        deadline = start + self.timeout_s
        nap = 20e-6
        while words[index] < seq:
            aborted_by = words[_HDR_ABORTED_BY]
            if aborted_by:
                self._broken = f"rank {aborted_by - 1} aborted the group"
                raise RuntimeError(
                    f"ShmGroup rank {self.rank}: call {seq} abandoned, rank {aborted_by - 1} "
                    f"aborted the group (it timed out or failed) while rank {self.rank} waited "
                    f"for rank {peer}"
                )
            now = time.monotonic()
            if now > deadline:
                self._fail(
                    RuntimeError,
                    f"timed out after {self.timeout_s:g} s in call {seq} waiting for rank {peer} "
                    f"(the last call it published was {words[index]}); is that worker alive?",
                )
            if now - start < 2e-3:
                os.sched_yield()
            else:
                time.sleep(nap)
                nap = min(nap * 2, 250e-6)

    def _fail(self, exc_type: type[Exception], message: str) -> None:
        """Mark the group broken, tell peers through the abort word, raise."""
        self._broken = message
        if self._mmap is not None and not self._words[_HDR_ABORTED_BY]:
            self._words[_HDR_ABORTED_BY] = self.rank + 1
        raise exc_type(f"ShmGroup rank {self.rank}: {message}")


def _segment_path(name: str) -> str:
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"shared-memory segment name must be a plain file name, got {name!r}")
    return os.path.join(SHM_DIR, name)


def _slot_bytes(max_elems: int) -> int:
    return math.ceil(max_elems * _SLOT_ITEMSIZE / _LINE_BYTES) * _LINE_BYTES


def _data_offset(world: int) -> int:
    return (1 + world) * _LINE_BYTES


def _segment_bytes(world: int, max_elems: int) -> int:
    return _data_offset(world) + 2 * world * _slot_bytes(max_elems)


def _pack_meta(op: int, dtype: torch.dtype, numel: int) -> int:
    return (numel << 8) | (_DTYPE_CODES[dtype] << 4) | op


def _describe_meta(meta: int) -> str:
    op, code, numel = meta & 0xF, (meta >> 4) & 0xF, meta >> 8
    return f"{_OP_NAMES.get(op, f'op {op}')} of {numel} {_DTYPE_NAMES.get(code, f'dtype {code}')} elements"
