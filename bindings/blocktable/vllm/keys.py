"""The 64-bit key of a request's row.

A request's row is claimed by the scheduler under

    key = int.from_bytes(blake2b(req_id_utf8 + b"\\0" + incarnation_u32_le,
                                 digest_size=8).digest(), "little")

where `req_id` is vLLM's request id (``Request.request_id`` in the scheduler,
the ``req_id`` of the SchedulerOutput in the workers) and `incarnation` counts
the times the request's blocks were (re)allocated from nothing: 0 when it is
first scheduled, +1 each time it resumes after a preemption (the scheduler
freed all its blocks; the workers see it in ``resumed_req_ids``). A preempted
request's old row may still be read by a batch in flight (async scheduling)
while its new one is written, so the two must not share a key.

blake2b and not Python's hash(): the key must be the same in every process
(hash randomisation differs between them).
"""
from hashlib import blake2b

__all__ = ["request_key"]


def request_key(req_id, incarnation=0):
    """The row key of request `req_id` in its `incarnation`-th allocation."""
    h = blake2b(req_id.encode("utf-8") + b"\0" + int(incarnation).to_bytes(4, "little"),
                digest_size=8)
    return int.from_bytes(h.digest(), "little")
