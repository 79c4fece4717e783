"""Measured optimizer-state memory (test-only; never on the patch path).

``StateMemoryMeter`` measures the live bytes of an optimizer's state over a run without asking the
optimizer: it does not call ``state_bytes()``, ``peak_state_bytes()`` or ``_note_bytes``, nor read
``nbytes`` of the package's state classes. It is a ``TorchDispatchMode``: every ATen operation run
while it is active (factory functions such as ``torch.zeros`` included) passes through it, and after
each one it

1. closes the storages that died since the previous operation (a ``StorageWeakRef`` per storage:
   ``expired()`` once the last tensor using it is gone),
2. registers every storage the operation returned that it has not seen alive (``data_ptr``,
   ``nbytes``; views and in-place results share a live storage and count once),
3. walks ``optimizer.state`` (dicts, lists, tuples and the attributes of any object in them, such as
   the codes and scales of a packed moment) and marks the storages found there as *state*.

A storage is state if it is found in ``optimizer.state`` at any walk, and it counts from the
operation that allocated it to the first operation after it died. So a re-coded unit's new codes
count from their allocation, while the unit still holds its old codes, not from the moment they
replace them: the transient copy of a precision transition is seen. Scratch tensors (the fp32 chunk
of a transition, the step's temporaries) never enter ``optimizer.state`` and do not count. Memory
only grows at an allocation, and every allocation is an operation, so the maximum over operations
is the peak.

Codebook lookup tables (``Codebook``: constants shared by every unit of a width) are not walked:
they are not optimizer state in the package's definition (codes, scales, factored statistics, fp32
moments of small tensors, step counters). Storages that exist when the meter starts are registered
by the first walk.

Use ``with meter:`` around the calls to measure (several times: the events continue); read
``peak_bytes()``, ``live_bytes()`` (state bytes alive at the last operation) and ``timeline()``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..formats.codebooks import Codebook


class _Record:
    __slots__ = ("nbytes", "start", "end", "state", "ref")

    def __init__(self, nbytes: int, start: int, ref: StorageWeakRef):
        self.nbytes, self.start, self.end, self.state, self.ref = nbytes, start, None, False, ref


class StateMemoryMeter(TorchDispatchMode):
    """Live bytes of ``optimizer.state`` after every ATen operation (see the module docstring)."""

    def __init__(self, optimizer: Any):
        super().__init__()
        self.optimizer = optimizer
        self.event = 0
        self.records: list[_Record] = []
        self._live: dict[int, _Record] = {}  # data_ptr -> its live storage's record
        self._sample()

    # ------------------------------------------------------------------ bookkeeping of storages
    def _see(self, t: torch.Tensor) -> _Record | None:
        if not isinstance(t, torch.Tensor) or t.is_meta or t.device.type == "meta":
            return None
        s = t.untyped_storage()
        n = s.nbytes()
        if n == 0:
            return None
        ptr = s.data_ptr()
        rec = self._live.get(ptr)
        if rec is None or rec.nbytes != n:
            if rec is not None:  # the address holds another storage now: the old one is gone
                rec.end = self.event
            rec = _Record(n, self.event, StorageWeakRef(s))
            self.records.append(rec)
            self._live[ptr] = rec
        return rec

    def _walk(self, obj: Any, seen: set[int]) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            rec = self._see(obj)
            if rec is not None:
                rec.state = True
        elif isinstance(obj, dict):
            for v in obj.values():
                self._walk(v, seen)
        elif isinstance(obj, (list, tuple, set)):
            for v in obj:
                self._walk(v, seen)
        elif isinstance(obj, Codebook) or obj is None or isinstance(obj, (str, bytes, int, float, bool)):
            return
        else:
            names = list(getattr(obj, "__dict__", {}))
            for cls in type(obj).__mro__:
                names += [n for n in getattr(cls, "__slots__", ()) if isinstance(n, str)]
            for n in names:
                if hasattr(obj, n):
                    self._walk(getattr(obj, n), seen)

    def _sample(self, outputs: Any = ()) -> None:
        self.event += 1
        for ptr, rec in list(self._live.items()):
            if rec.ref.expired():
                rec.end = self.event
                del self._live[ptr]
        for t in tree_leaves(outputs):
            if isinstance(t, torch.Tensor):
                self._see(t)
        self._walk(self.optimizer.state, set())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._sample(out)
        return out

    def __exit__(self, *exc):
        result = super().__exit__(*exc)
        self._sample()  # state assigned after the last operation
        return result

    # ------------------------------------------------------------------ results
    def timeline(self) -> list[int]:
        """State bytes alive at each event (operation) since the meter was made."""
        delta = [0] * (self.event + 2)
        for r in self.records:
            if r.state:
                delta[r.start] += r.nbytes
                delta[r.end if r.end is not None else self.event + 1] -= r.nbytes
        out, now = [], 0
        for e in range(self.event + 1):
            now += delta[e]
            out.append(now)
        return out

    def peak_bytes(self) -> int:
        """The largest state bytes alive at any event."""
        return max(self.timeline())

    def live_bytes(self) -> int:
        """State bytes alive at the last event."""
        return self.timeline()[-1]
