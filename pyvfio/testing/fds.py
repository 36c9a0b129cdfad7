"""What a process holds open, for tests that check nothing leaks an fd.

Two views, for two kinds of check: :func:`fd_numbers` (which slots are taken;
a leak shows as a new number) and :func:`fd_targets` (slot *and* what it points
at, so a slot closed and reused for something else also shows).

Both are exact, so a test compares them with ``==``: the directory fd that
listing ``/proc/self/fd`` opens is listed too, but is closed by the time the
listing returns, and is left out (its ``readlink`` fails).  A test that lets
one stray fd through (``len(after - before) <= 1``) would pass a real leak of
one fd, which is the common kind.
"""

from __future__ import annotations

import os


def fd_targets(pid: int | str = "self") -> set[str]:
    """``"N:target"`` for every fd open in ``pid`` (default: this process),
    without the fd of the listing itself."""
    out = set()
    for n in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.add(f"{n}:{os.readlink(f'/proc/{pid}/fd/{n}')}")
        except OSError:  # the listing's own fd (closed by now), or one closed meanwhile
            pass
    return out


def fd_numbers(pid: int | str = "self") -> set[int]:
    """The fd numbers open in ``pid`` (default: this process), without the fd
    of the listing itself."""
    return {int(entry.split(":", 1)[0]) for entry in fd_targets(pid)}
