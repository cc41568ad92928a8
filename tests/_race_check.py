"""A memory-hazard checker for Triton kernels run by the interpreter (``TRITON_INTERPRET=1``).

The interpreter runs each block operation on whole tensors at once and one program after the
other, so it can never show a race.  On a GPU the threads of one program run the operations in
their own order between CTA barriers (``tl.debug_barrier()``), and programs run concurrently.
This module records every load and store the interpreter performs and reports the accesses that
would be hazards on a GPU:

* within one program and one barrier epoch (the accesses between two barriers):
  - RAW: a load of an address that a store wrote in the same epoch,
  - WAR: a store to an address that a load read in the same epoch,
  - WAW: two stores to one address in the same epoch,
  except a *read-modify-write*: a load and a store of the very same pointer tensor inside one
  helper function (``tl.store(p, tl.load(p) + v)``: each element's store depends on its own
  load, so the thread order cannot matter);
* across programs of one launch: an address that one program writes and another reads or writes.

Conservative by design: it does not know Triton's layouts (two accesses of one element by one
thread are safe), so it asks for a barrier wherever two *different* access sites touch an address
in one epoch.  Usage::

    with RaceCheck() as rc:
        launch(...)
    assert not rc.hazards, rc.report()
"""
from __future__ import annotations

import os
import sys
from typing import Dict, List, Tuple

import numpy as np
import triton

#: frames in these files are Triton's interpreter machinery or this checker, not kernel code
_SKIP = (os.path.dirname(triton.__file__), os.path.abspath(__file__))


class _Site:
    """Where an access happened: the kernel-code frames (innermost first) and the pointer tensor."""

    __slots__ = ("frames", "lines", "key")

    def __init__(self, ptrs: np.ndarray):
        frames, lines = [], []
        f = sys._getframe(2)
        # up to the interpreter's grid loop (beyond it: the host launcher)
        while f is not None and type(f.f_locals.get("self")).__name__ != "GridExecutor":
            if not f.f_code.co_filename.startswith(_SKIP):  # the kernel's code, not Triton's or ours
                frames.append(f)
                lines.append(f"{f.f_code.co_name}:{f.f_lineno}")
            f = f.f_back
        self.frames = frames
        self.lines = tuple(lines)
        self.key = (ptrs.shape, ptrs.tobytes())

    def rmw_with(self, other: "_Site") -> bool:
        """One pointer tensor, loaded and stored inside one helper (not the kernel's own body)."""
        if self.key != other.key:
            return False
        helpers = {id(f) for f in self.frames[:-1]}
        return any(id(f) in helpers for f in other.frames[:-1])

    def where(self) -> str:
        return " <- ".join(self.lines)


class RaceCheck:
    """Context manager: patches the interpreter's builder to record accesses (see module doc)."""

    def __init__(self, max_hazards: int = 20):
        self.hazards: List[str] = []
        self.max_hazards = max_hazards

    # ------------------------------------------------------------------ recording
    def _new_launch(self):
        self.pid = None
        self.writers: Dict[int, int] = {}
        self.readers: Dict[int, set] = {}
        self.cross: List[str] = []

    def _new_program(self, pid):
        self.pid = pid
        self.epoch = 0
        self.stored: Dict[int, Tuple[int, _Site]] = {}
        self.loaded: Dict[int, Tuple[int, List[_Site]]] = {}

    def _flag(self, kind: str, addr: int, a: _Site, b: _Site):
        msg = f"{kind} in program {self.pid}, epoch {self.epoch}, address {addr:#x}: {a.where()}  vs  {b.where()}"
        if msg not in self.hazards and len(self.hazards) < self.max_hazards:
            self.hazards.append(msg)

    def _cross(self, addr: int, kind: str, other: int):
        if len(self.hazards) < self.max_hazards:
            msg = f"program {self.pid} {kind} address {addr:#x} that program {other} writes in the same launch"
            if msg not in self.hazards:
                self.hazards.append(msg)

    def _on_load(self, ptrs, mask):
        site = _Site(ptrs)
        for addr in np.asarray(ptrs)[np.asarray(mask, dtype=bool)].ravel().tolist():
            st = self.stored.get(addr)
            if st is not None and st[0] == self.epoch and not st[1].rmw_with(site):
                self._flag("RAW", addr, st[1], site)
            ld = self.loaded.get(addr)
            if ld is None or ld[0] != self.epoch:
                self.loaded[addr] = (self.epoch, [site])
            elif not any(s is site or s.key == site.key and s.lines == site.lines for s in ld[1]):
                ld[1].append(site)
            w = self.writers.get(addr)
            if w is not None and w != self.pid:
                self._cross(addr, "reads", w)
            self.readers.setdefault(addr, set()).add(self.pid)

    def _on_store(self, ptrs, mask):
        site = _Site(ptrs)
        for addr in np.asarray(ptrs)[np.asarray(mask, dtype=bool)].ravel().tolist():
            ld = self.loaded.get(addr)
            if ld is not None and ld[0] == self.epoch:
                for s in ld[1]:
                    if not s.rmw_with(site):
                        self._flag("WAR", addr, s, site)
            st = self.stored.get(addr)
            if st is not None and st[0] == self.epoch and st[1].key != site.key:
                self._flag("WAW", addr, st[1], site)
            self.stored[addr] = (self.epoch, site)
            w = self.writers.get(addr)
            if w is not None and w != self.pid:
                self._cross(addr, "writes", w)
            self.writers[addr] = self.pid
            others = self.readers.get(addr, set()) - {self.pid}
            if others:
                self._cross(addr, "writes (others read it)", min(others))

    # ------------------------------------------------------------------ patching
    def __enter__(self):
        from triton.runtime import interpreter as I

        b = I.interpreter_builder
        self._builder = b
        orig_load, orig_store, orig_barrier, orig_idx = (b.create_masked_load, b.create_masked_store,
                                                          b.create_barrier, b.set_grid_idx)

        def load(ptrs, mask, other, *args):
            self._on_load(ptrs.data, mask.data)
            return orig_load(ptrs, mask, other, *args)

        def store(ptrs, value, mask, *args):
            self._on_store(ptrs.data, mask.data)
            return orig_store(ptrs, value, mask, *args)

        def barrier():
            self.epoch += 1
            return orig_barrier()

        def set_grid_idx(x, y, z):
            if (x, y, z) == (0, 0, 0):
                self._new_launch()
            self._new_program((x, y, z))
            return orig_idx(x, y, z)

        b.create_masked_load, b.create_masked_store = load, store
        b.create_barrier, b.set_grid_idx = barrier, set_grid_idx
        self._new_launch()
        self._new_program(None)
        return self

    def __exit__(self, *exc):
        for name in ("create_masked_load", "create_masked_store", "create_barrier", "set_grid_idx"):
            self._builder.__dict__.pop(name, None)
        return False

    def report(self) -> str:
        return "memory hazards a GPU would race on:\n  " + "\n  ".join(self.hazards)
