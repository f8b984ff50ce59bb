"""Failure isolation (``on_batch_error="isolate"``): find the records a batch failed on.

When ``process_fn`` raises an ``Exception`` on a batch of more than one
record, the batch is split in halves and each half is run again, and so on
recursively: a part that succeeds delivers its results, a part that fails is
split again, and a record that fails alone gets the exception it failed
with.  So a record gets an exception only if ``process_fn`` raised it on that
record alone, and the others get their results.

Cost: a bad record among n costs about log2(n) extra calls, not n.  When the
left half of a failed part succeeds, the right half is known to hold what
failed, so it is split at once without a call of its own (a single record is
always run alone before it is failed, so a failure that does not come back
fails nobody).  Parts run one after another, in the batch's order, in the
processing slot of the batch.

Records cancelled while their batch is re-run are left out of the next parts;
a part that lost records is run again before it is split or failed, since
what it failed on may have gone.  Other failures (a ``BaseException``, a
result list of the wrong shape) are not isolated: they settle the part as a
first call would.

Owns: the order of the re-runs.  Must not touch: how a call is made or
settled (``_processing.py`` does both, through ``attempt`` and ``alone``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from ._pending import Record


class Raised:
    """``process_fn`` raised ``error`` on a part, whose futures were left unresolved for isolation."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


Attempt = Callable[[list[Record[Any]]], Awaitable[object]]
"""Run ``process_fn`` on a part: a [Raised][] leaves its futures to us; anything else settled them."""


class _Part:
    """A part of a failed batch, waiting on the stack to be run or split."""

    __slots__ = ("error", "records", "right", "split_error")

    def __init__(self, records: list[Record[Any]], error: Exception | None = None) -> None:
        self.records = records
        self.error = error
        """What the part is known to fail with (then it is split without a call), or None."""
        self.right: _Part | None = None
        """For a left half: its sibling, which fails for sure if this half succeeds."""
        self.split_error: Exception | None = None
        """For a left half: what the parent failed with."""


async def isolate(
    records: list[Record[Any]],
    error: Exception,
    attempt: Attempt,
    alone: Callable[[Record[Any], Exception], object],
) -> None:
    """Re-run the halves of a batch that failed with ``error`` until each failure is one record's own.

    Args:
        records: The batch, whose futures are unresolved (but for cancels).
        error: What ``process_fn`` raised on the whole batch.
        attempt: Runs ``process_fn`` on a part (see [Attempt][]).
        alone: Fails one record with what it raised when run alone.
    """
    stack = [_Part(records, error)]
    while stack:
        part = stack.pop()
        live = [rec for rec in part.records if not rec.done()]
        if not live:
            continue
        error_now = part.error if len(live) == len(part.records) else None  # a part that lost records runs again
        if error_now is None:
            outcome = await attempt(live)
            if not isinstance(outcome, Raised):
                if outcome is None and part.right is not None and len(part.right.records) > 1:
                    part.right.error = part.split_error  # the failure is on the right: split it at once
                continue
            error_now = outcome.error
        if len(live) == 1:
            alone(live[0], error_now)
            continue
        middle = len(live) // 2
        left, right = _Part(live[:middle]), _Part(live[middle:])
        left.right, left.split_error = right, error_now
        stack.append(right)
        stack.append(left)
