"""A bounded pool of execution slots, and device buffers reused across calls.

TensorRT requires each execution context that runs concurrently to use its own optimization
profile; an engine built with N profiles (build-engines --contexts N) therefore serves at most
N calls at once. The pool creates a slot (context + profile index + CUDA stream + buffers)
lazily for profile i, hands slots to threads one at a time, makes a thread wait while all N are
in use, reuses them, and destroys every slot it created on close. Plain Python over the
make/destroy functions it is given, so it is tested with real threads and no GPU.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterator

from runtime.errors import Blip2EdgeError


class SlotPool:
    def __init__(self, size: int, make: Callable[[int], object], destroy: Callable[[object], None]):
        if size < 1:
            raise Blip2EdgeError(f"an engine needs at least one optimization profile, this one has {size}")
        self.size = size
        self._make, self._destroy = make, destroy
        self._free: list = []
        self._unused = list(range(size))  # profile indexes with no slot yet
        self.created = 0
        self._closed = False
        self._cond = threading.Condition()

    @contextmanager
    def acquire(self) -> Iterator[object]:
        slot = self._take()
        try:
            yield slot
        finally:
            with self._cond:
                if self._closed:  # closed while this slot ran: destroy it now that it is idle
                    self._destroy(slot)
                else:
                    self._free.append(slot)
                    self._cond.notify()

    def _take(self):
        with self._cond:
            while True:
                if self._closed:
                    raise Blip2EdgeError("this TensorRT runner is closed")
                if self._free:
                    return self._free.pop()
                if self._unused:
                    index = self._unused.pop(0)  # reserved: created outside the lock
                    break
                self._cond.wait()
        try:
            slot = self._make(index)
        except BaseException:
            with self._cond:  # the profile index is free again for the next caller
                self._unused.insert(0, index)
                self._cond.notify()
            raise
        with self._cond:
            self.created += 1
        return slot

    def close(self) -> None:
        """Destroys the idle slots now and the busy ones when they are released; a later
        acquire raises."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            idle, self._free = self._free, []
            self._cond.notify_all()
        for slot in idle:
            self._destroy(slot)



class DeviceBuffers:
    """One device buffer per tensor name, reused across calls and reallocated only when a call
    needs more bytes than it has (the old one freed first)."""

    def __init__(self, alloc: Callable[[int], int], free: Callable[[int], None]):
        self._alloc, self._free = alloc, free
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (pointer, bytes)

    def get(self, name: str, nbytes: int) -> int:
        nbytes = max(int(nbytes), 1)  # a zero-size tensor still needs a valid address
        held = self._buffers.get(name)
        if held is not None and held[1] >= nbytes:
            return held[0]
        if held is not None:
            del self._buffers[name]
            self._free(held[0])
        pointer = self._alloc(nbytes)
        self._buffers[name] = (pointer, nbytes)
        return pointer

    @property
    def total_bytes(self) -> int:
        return sum(n for _, n in self._buffers.values())

    def close(self) -> None:
        buffers, self._buffers = self._buffers, {}
        for pointer, _ in buffers.values():
            self._free(pointer)
