"""What a process holds open, for tests that check nothing leaks an fd.

Two views, for two kinds of check: :func:`fd_numbers` (which slots are taken;
a leak shows as a new number) and :func:`fd_targets` (slot *and* what it points
at, so a slot closed and reused for something else also shows).
"""

from __future__ import annotations

import os


def fd_numbers(pid: int | str = "self") -> set[int]:
    """The fd numbers open in ``pid`` (default: this process)."""
    return {int(n) for n in os.listdir(f"/proc/{pid}/fd")}


def fd_targets(pid: int | str = "self") -> set[str]:
    """``"N:target"`` for every fd open in ``pid``.  The directory fd of the
    listing itself is gone by the time it is read, so it is left out."""
    out = set()
    for n in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.add(f"{n}:{os.readlink(f'/proc/{pid}/fd/{n}')}")
        except OSError:
            pass
    return out
