"""The message headers hypha adds to Celery task messages (unsigned, so read defensively).

``hypha_envelope`` (the signed envelope) is defined beside its format, in
:mod:`hypha_celery.security`.
"""

from __future__ import annotations

__all__ = ["ATTEMPT", "FIRST_SEEN", "RECHECK", "SENT_AT"]

SENT_AT = "hypha_sent_at"  # unix time a scheduler first published the task, for queue_wait_s
ATTEMPT = "hypha_attempt"  # how many times admission deferred this task
FIRST_SEEN = "hypha_first_seen"  # unix time a worker first saw it, for the admission bound
RECHECK = "hypha_recheck"  # a copy re-sent while another copy ran: check the result first
