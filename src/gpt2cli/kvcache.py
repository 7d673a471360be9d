"""The KV cache of a batch being decoded, and the memory it lives in.

`DecodeState` holds every layer's keys and values for B rows of up to C positions; `DecodeState.
empty` allocates one, once `check_fits` agrees it fits in the memory available now. The arrays
come from `lazy_zeros`, paged in 4 KiB at a time as rows are written, and `keep_freed_memory`
keeps malloc from handing a forward pass's freed activations back to the system. Shapes: L
n_layer, B rows, H n_head, C capacity, hd head width.
"""

from __future__ import annotations

import ctypes
import math
import mmap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from gpt2cli.config import GPT2Config
from gpt2cli.errors import GPT2Error

Array = NDArray[np.floating[Any]]  # float32 throughout; numpy stubs cannot track it


def lazy_zeros(shape: tuple[int, ...]) -> Array:
    """float32 zeros in anonymous memory that becomes resident 4 KiB page by page as it is
    written: for a KV cache, whose rows use only the first positions of their capacity, and for
    the logits of every position (filling 206 MB of them took 0.13 s instead of 0.37-0.55 s).

    Why not np.zeros: NumPy asks the kernel for huge pages on large arrays (MADV_HUGEPAGE), so
    writing a row's first positions faults in whole 2 MiB pages across the cache. Measured with
    8 rows of short prompts at capacity 1,024 (124M): admitting them made 574-603 MiB resident,
    and took up to 4.7 s while the kernel compacted memory; in 4 KiB pages, 26 MiB and 0.7 s.
    """
    count = math.prod(shape)
    size = max(4 * count, 1)  # mmap refuses 0 bytes
    if hasattr(mmap, "MAP_PRIVATE"):  # Unix: private, as malloc's memory is (not shared memory)
        buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)  # zero pages, made on first write
        if hasattr(mmap, "MADV_NOHUGEPAGE"):  # Linux
            buffer.madvise(mmap.MADV_NOHUGEPAGE)
    else:
        buffer = mmap.mmap(-1, size)
    return np.frombuffer(buffer, np.float32, count).reshape(shape)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters, from glibc's <malloc.h>


def keep_freed_memory() -> None:
    """Ask glibc's malloc to keep freed blocks of up to 32 MB for reuse rather than give them
    back to the system: a forward pass frees and reallocates tens of MB of activations per
    layer, and memory given back must be faulted in again page by page. Measured on a 1,024-token
    prefill (124M): about 100,000 page faults, 18,400 of them the KV cache's own, fell to 18,400.
    Process-wide, and up to 128 MB of freed memory stays with the process; nothing happens
    where the C library has no mallopt (not glibc: macOS, Windows).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # TypeError: Windows loads no library None
        return
    mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # blocks below this come from the heap, reused
    mallopt(_M_TRIM_THRESHOLD, 128 << 20)  # free heap kept before any is given back


def available_memory() -> int | None:
    """Bytes of memory the system can still give (Linux's MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_fits(config: GPT2Config, n_batch: int, capacity: int, *, logits: int) -> None:
    """Raise GPT2Error unless a KV cache of n_batch rows x `capacity` positions and `logits`
    rows of logits (with room for two working copies) fit in the memory available now.

    The cache is paged in as it is written (`lazy_zeros`), so without this check a batch too
    large for the machine would fail late, as an out-of-memory kill.
    """
    c = config
    cache = 2 * c.n_layer * n_batch * c.n_head * capacity * c.head_dim * 4  # K and V
    needed = cache + 3 * logits * c.n_vocab * 4
    available = available_memory()
    if available is not None and needed > available:
        raise GPT2Error(
            f"{n_batch} sequence(s) of {capacity} positions need about {needed / 2**30:.1f} "
            f"GiB (KV cache and logits), but {available / 2**30:.1f} GiB of memory is "
            "available; use fewer samples or shorter inputs"
        )


@dataclass
class DecodeState:
    """The KV cache of a batch being decoded, allocated once with room for `capacity` positions.

    Row b holds `lengths[b]` positions. `room[b]` is how many more tokens its sequence may grow
    by: the logits `GPT2.prefill`/`GPT2.step` just returned may be sampled while it is at least
    1, and a row whose room is 0 has reached its capacity, which is finish reason "length" (a
    capacity is never more than the model's n_ctx).
    """

    keys: Array  # [L, B, H, C, hd]
    values: Array  # [L, B, H, C, hd]
    lengths: NDArray[np.intp]  # [B]

    @classmethod
    def empty(cls, config: GPT2Config, n_batch: int, capacity: int, *, logits: int) -> DecodeState:
        """A zeroed cache for n_batch rows of `capacity` positions, all rows empty, once
        `check_fits` agrees that it and `logits` rows of logits fit in memory.

        Zeros, not np.empty: in a batch, a short row's attention spans positions it never wrote
        (the longest row's), masked to weight 0, and 0 * a stray NaN would still be NaN. The
        zeros cost nothing up front: `lazy_zeros` pages them in 4 KiB at a time as rows are
        written.
        """
        check_fits(config, n_batch, capacity, logits=logits)
        c = config
        shape = (c.n_layer, n_batch, c.n_head, capacity, c.head_dim)  # [L, B, H, C, hd]
        return cls(
            keys=lazy_zeros(shape),
            values=lazy_zeros(shape),
            lengths=np.zeros(n_batch, np.intp),
        )

    @property
    def capacity(self) -> int:
        """Positions each row can hold (prompt plus generated tokens)."""
        return int(self.keys.shape[3])

    @property
    def room(self) -> NDArray[np.intp]:
        """Tokens each row may still be extended by: capacity - lengths, [B]."""
        return self.capacity - self.lengths

    def reorder(self, rows: Sequence[int], sources: Sequence[int]) -> None:
        """Row rows[i] takes over what row rows[sources[i]] holds (keys, values and length):
        how beam search moves its beams' histories after a step, within the request's own
        rows. Only rows whose source is another row are copied, and only the positions in use.
        """
        moved = [i for i, s in enumerate(sources) if s != i]
        if not moved:
            return
        target = np.asarray(rows)[moved]  # [m]
        source = np.asarray(rows)[np.asarray(sources)[moved]]  # [m]
        n = int(self.lengths[source].max())
        for cache in (self.keys, self.values):
            for layer in cache:  # [B, H, C, hd]: a layer at a time, its copy stays in cache
                layer[target, :, :n] = layer[source, :, :n]  # the right side is a copy first
        self.lengths[target] = self.lengths[source]

    def rows(self, start: int, stop: int) -> DecodeState:
        """Rows start..stop-1 as a cache of their own that shares this one's memory: running it
        (`GPT2.step`) writes straight into these rows, lengths included."""
        return DecodeState(
            self.keys[:, start:stop], self.values[:, start:stop], self.lengths[start:stop]
        )
