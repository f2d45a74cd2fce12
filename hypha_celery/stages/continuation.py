"""Where a copy of a generation continues from: the tokens its earlier run streamed, checked.

A ``hypha.generate`` whose worker died is handed to another worker (the sweeper re-publishes it).
Its token stream (:mod:`hypha_celery.token_stream`) holds what the dead run produced, all but the
tokens since its last write (at most ``STREAM_INTERVAL_S`` of them). The copy continues after those:
its prompt plus the streamed tokens are the new prefix, and they count towards ``max_new_tokens``.

* Greedy: continued from every streamed token; the text equals the uninterrupted run's.
* Seeded sampling: continued from the tokens the kept generator state belongs to, with that state,
  so the draws are the uninterrupted run's (on the same device kind: the state is a CPU or a CUDA
  generator's). Without a state (it was lost), from the start: the seed replays the same tokens.
* Unseeded sampling: continued from every streamed token, with fresh randomness.

The stream is not signed (anyone who can write the result backend can write it): the worker that
continues signs the whole result, whose ``resumed_from_token`` and ``workers`` say which tokens it
computed; a scheduler that wants every token computed by the signer sends ``resume=False``, and a copy
then generates from the start. A copy whose record is gone (expired, a Redis restarted empty) or
refused (a gap, an entry that does not parse, more tokens than the task may produce) generates from
the start and says so; what the stream already holds is still not appended again (a writer resumes
after it), so a reader never sees a character twice. The task's time budget counts from the first run's admission (``since``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from hypha_celery.token_stream import Record

__all__ = ["FIRST_RUN", "Continuation", "plan"]


@dataclass(frozen=True)
class Continuation:
    """What a run of a generation starts from.

    ``resume``: completion tokens to continue after (empty: from the start); ``rng``: the generator
    state after them; ``held_text``/``held_tokens``: what the stream holds already (a writer appends
    after it); ``workers``: the earlier runs' workers; ``since``: when the first run was admitted
    (None: this is the first); ``restarted``: why a copy generates from the start (None otherwise).
    """

    resume: list[int]
    rng: str | None = None
    held_text: str = ""
    held_tokens: int = 0
    workers: tuple[str, ...] = ()
    since: float | None = None
    restarted: str | None = None


FIRST_RUN = Continuation(resume=[])


def plan(record: Record | None, *, seeded_sampling: bool, resume: bool = True) -> Continuation:
    """What a copy of a generation (one that may have run before) continues from, given its stream's ``record``;
    ``resume`` False (the task's own choice): from the start, whatever the record holds."""
    if record is None:
        return Continuation(resume=[], restarted="no token record of an earlier run (none was written before "
                                                 "its worker died, it expired, or its Redis lost it): generated "
                                                 "from the start")
    held = Continuation(resume=[], held_text=record.text, held_tokens=record.held, workers=record.workers,
                        since=record.since or None)
    if not resume:
        return replace(held, restarted="the task asked not to be continued (resume=False): generated from the start")
    if record.refused:
        return replace(held, restarted=f"its token record was refused ({record.refused}): generated from the start")
    if not seeded_sampling:
        return replace(held, resume=list(record.ids))
    if record.rng_tokens < 0:
        return replace(held, restarted="no generator state was kept for its seeded sampling: generated from the "
                                       "start (the seed draws the same tokens)")
    return replace(held, resume=list(record.ids[:record.rng_tokens]), rng=record.rng)
