"""The few collectives ``evolve`` needs, over ``mx.distributed``.

Every rank runs the same CMA-ES (same state, same seed), so the only things exchanged
are: the starting state (rank 0 reads the run folder or ``--init-from`` and shares it
once), each generation's fitness table, and a digest of the updated state to prove the
ranks still agree. All of it travels as int64 through ``all_sum`` with zero-filled
vectors: every slot has exactly one non-zero contributor, so the sum *is* that
contribution, bit for bit (float64 values are sent as their int64 bit patterns, which
makes the result exact whatever the backend does with floats, NaN payloads included).

Start several processes with ``mlx.launch`` (see :mod:`namm_mlx.evolve` for the exact
command); ``mx.distributed.init()`` then returns the group, otherwise a group of one and
nothing here touches the network. The collectives run on the CPU stream (the ring and
MPI backends are CPU backends).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from ..errors import NammError

__all__ = ["Collective", "DistributedError"]


class DistributedError(NammError, RuntimeError):
    """Another rank failed, or the ranks disagree; one line for users."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class Collective:
    """A process group (``mx.distributed.Group``) with the exchanges ``evolve`` uses."""

    def __init__(self, group: Any = None) -> None:
        if group is None:
            import mlx.core as mx

            group = mx.distributed.init()
        self.group = group
        self.rank = int(group.rank())
        self.size = int(group.size())

    @classmethod
    def single(cls) -> "Collective":
        """A one-process group that never touches ``mx.distributed``."""
        return cls(_SingleGroup())

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    # -------------------------------------------------------------------- primitives
    def sum_int64(self, values: np.ndarray) -> np.ndarray:
        """Element-wise int64 sum over all ranks (the identity for one process)."""
        values = np.ascontiguousarray(values, dtype=np.int64)
        if self.size == 1:
            return values.copy()
        import mlx.core as mx

        total = mx.distributed.all_sum(mx.array(values), group=self.group, stream=mx.cpu)
        return np.array(total, dtype=np.int64)

    def gather_ints(self, value: int) -> list[int]:
        """Every rank's ``value`` (an int64), in rank order."""
        slots = np.zeros(self.size, np.int64)
        slots[self.rank] = value
        return [int(v) for v in self.sum_int64(slots)]

    # --------------------------------------------------------------------- exchanges
    def share_from_root(self, payload: bytes | None, error: str | None = None) -> bytes:
        """Rank 0's ``payload`` on every rank; rank 0 may send ``error`` instead, which
        every other rank raises as :class:`DistributedError` (rank 0 raises its own
        exception after this returns, so no rank is left waiting)."""
        if self.size == 1:
            if error is not None:
                raise DistributedError(error)
            return payload or b""
        if self.is_root:
            body = error.encode() if error is not None else (payload or b"")
            header = np.array([2 if error is not None else 1, len(body)], np.int64)
        else:
            body, header = b"", np.zeros(2, np.int64)
        status, length = (int(v) for v in self.sum_int64(header))
        words = -(-length // 8)
        if self.is_root:
            buf = np.zeros(words * 8, np.uint8)
            buf[:length] = np.frombuffer(body, np.uint8)
            data = buf.view(np.int64)
        else:
            data = np.zeros(words, np.int64)
        raw = self.sum_int64(data).view(np.uint8)[:length].tobytes()
        if status == 2:
            if self.is_root:
                return b""
            raise DistributedError(f"rank 0 failed: {raw.decode(errors='replace')}")
        return raw

    def gather_members(
        self,
        pop_size: int,
        member_ids: list[int],
        fitness: list[float],
        kept: list[float],
        failed: bool,
    ) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """Assemble the population's fitness and kept fractions from every rank's members.

        Returns ``(fitness [pop], kept [pop] (NaN where not reported), failed ranks)``."""
        vec = np.zeros(2 * pop_size + self.size, np.int64)
        if not failed:
            ids = np.asarray(member_ids, dtype=np.int64)
            vec[ids] = np.asarray(fitness, dtype=np.float64).view(np.int64)
            vec[pop_size + ids] = np.asarray(kept, dtype=np.float64).view(np.int64)
        vec[2 * pop_size + self.rank] = 1 if failed else 0
        total = self.sum_int64(vec)
        failed_ranks = [r for r in range(self.size) if total[2 * pop_size + r]]
        f = total[:pop_size].copy().view(np.float64)
        k = total[pop_size : 2 * pop_size].copy().view(np.float64)
        return f, k, failed_ranks

    def check_agreement(self, arrays: list[np.ndarray], scalars: list[Any], failed: bool) -> list[int]:
        """Raise unless every rank holds bitwise identical ``arrays``/``scalars``.

        ``failed`` marks this rank as having failed since the last exchange (e.g. rank 0
        could not write its checkpoint); the failed ranks are returned so every rank stops
        together."""
        if self.size == 1:
            return [0] if failed else []
        digest = hashlib.blake2b(digest_size=7)
        for a in arrays:
            digest.update(np.ascontiguousarray(a).tobytes())
        digest.update(repr(scalars).encode())
        value = int.from_bytes(digest.digest(), "little")
        slots = np.zeros(2 * self.size, np.int64)
        slots[self.rank] = value
        slots[self.size + self.rank] = 1 if failed else 0
        total = self.sum_int64(slots)
        failed_ranks = [r for r in range(self.size) if total[self.size + r]]
        if not failed_ranks and len(set(int(v) for v in total[: self.size])) != 1:
            raise DistributedError(
                "the ranks' CMA-ES states diverged (different numpy/BLAS builds or non-deterministic "
                "fitness?); every rank must compute the same update"
            )
        return failed_ranks


class _SingleGroup:
    """Stand-in for ``mx.distributed.Group`` of size one."""

    def rank(self) -> int:
        return 0

    def size(self) -> int:
        return 1
