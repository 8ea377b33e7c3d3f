"""The pull's decisions without sockets: TransferPlan with time passed in, and the download state on disk."""

from __future__ import annotations

import hashlib
import random

import pytest

from agent.protocol.manifest import Manifest, model_section
from agent.transfer import (DownloadState, RetryPolicy, TransferPlan, chunk_message_size, max_window,
                            progress_step)

NO_JITTER = RetryPolicy(base_s=2.0, cap_s=16.0, jitter=0.0)


def plan(count: int = 10, **kwargs) -> TransferPlan:
    kwargs.setdefault("retry", NO_JITTER)
    kwargs.setdefault("now", 0.0)
    return TransferPlan(count, rng=random.Random(1), **kwargs)


def test_asks_for_the_first_window_in_order_then_waits():
    p = plan(10, window=4)
    assert p.next_requests(0.0) == [0, 1, 2, 3]
    assert p.next_requests(0.5) == [], "a full window asks for nothing more until something arrives"


def test_an_arrival_frees_a_slot_for_the_next_missing_chunk():
    p = plan(10, window=4)
    p.next_requests(0.0)
    assert p.received(1, 0.1) is True
    assert p.next_requests(0.1) == [4]
    assert p.received(1, 0.2) is False, "a second copy is not progress"


def test_chunks_arriving_unasked_are_kept_and_never_requested():
    p = plan(10, window=2)
    p.next_requests(0.0)                    # 0, 1
    assert p.received(7, 0.1) is True       # another device asked for it on the shared stream
    p.received(0, 0.2)
    p.received(1, 0.2)
    asked = p.next_requests(0.2)
    assert asked == [2, 3]
    while not p.complete:
        for i in asked:
            p.received(i, 1.0)
        asked = p.next_requests(1.0)
        assert 7 not in asked
    assert p.requests_sent == 9


def test_resumes_asking_only_for_what_is_missing():
    p = plan(6, window=8, present=[0, 1, 3, 5])
    assert p.missing() == [2, 4]
    assert p.next_requests(0.0) == [2, 4]


def test_a_lost_chunk_is_asked_again_with_doubling_waits():
    p = plan(3, window=1)
    assert p.next_requests(0.0) == [0]
    assert p.next_requests(1.99) == []
    assert p.next_requests(2.0) == [0]      # first wait 2 s
    assert p.next_requests(5.99) == []
    assert p.next_requests(6.0) == [0]      # then 4 s
    assert p.next_requests(13.99) == []
    assert p.next_requests(14.0) == [0]     # then 8 s
    assert p.rerequests == 3


def test_a_chunk_in_flight_is_not_asked_again_while_others_keep_arriving():
    """Chunks arriving mean the stream delivers: what we asked for is queued behind them (100
    devices on two cores drained their copies for over 2 s); asking again would make the
    repository publish another copy to every device on the stream."""
    p = plan(10, window=4)
    assert p.next_requests(0.0) == [0, 1, 2, 3]
    p.received(1, 1.5)
    p.received(2, 3.0)                          # chunk 0's wait ran out at 2.0, but chunks keep coming
    assert p.next_requests(3.0) == [4, 5]
    assert p.next_wakeup(3.0) == 5.0, "two quiet seconds after the last arrival"
    assert p.next_requests(4.99) == []
    assert p.next_requests(5.0) == [0, 3, 4, 5], "the stream went quiet and every wait ran out: ask again"
    assert p.rerequests == 4


def test_waits_are_capped_and_jittered_upwards():
    policy = RetryPolicy(base_s=2.0, cap_s=10.0, jitter=0.5)
    rng = random.Random(7)
    firsts = [policy.timeout(1, rng) for _ in range(200)]
    assert min(firsts) >= 2.0 and max(firsts) <= 3.0
    assert len({round(t, 3) for t in firsts}) > 50, "devices must not retry in lockstep"
    assert all(10.0 <= policy.timeout(20, rng) <= 15.0 for _ in range(50))


def test_a_rejected_chunk_is_asked_again_soon_but_not_in_a_burst():
    p = plan(4, window=4, min_rerequest_s=0.25)
    p.next_requests(0.0)
    p.rejected(2, 0.05)                     # a corrupt copy of chunk 2 arrived
    assert p.next_requests(0.1) == []
    assert p.next_requests(0.25) == [2]
    p.rejected(2, 0.3)
    p.rejected(2, 0.31)                     # a flood of bad copies does not become a flood of requests
    assert p.next_requests(0.4) == []
    assert p.next_requests(0.5) == [2]
    assert p.rejected_count == 3


def test_reconnect_asks_again_for_everything_in_flight_at_once():
    p = plan(10, window=3)
    p.next_requests(0.0)
    p.received(0, 0.1)
    p.next_requests(0.1)                     # 1, 2, 3 in flight
    p.reconnected(0.5)
    assert p.next_requests(0.5) == [1, 2, 3]


def test_gives_up_only_after_the_stall_timeout_without_progress():
    p = plan(5, window=1, stall_timeout_s=10.0)
    p.next_requests(0.0)
    assert not p.expired(9.9)
    p.received(0, 9.0)                       # progress moves the deadline
    assert not p.expired(18.9)
    assert p.expired(19.0)
    assert p.next_wakeup(9.0) == 9.0, "a free slot means there is something to ask for now"


def test_next_wakeup_is_the_earliest_retry_or_the_deadline():
    p = plan(2, window=2, stall_timeout_s=30.0)
    p.next_requests(0.0)
    assert p.next_wakeup(0.0) == 2.0
    p.received(0, 1.0)
    p.received(1, 1.0)
    assert p.complete and not p.expired(1000.0)


def test_progress_steps_and_window_caps():
    assert progress_step(24, 0) is None
    assert progress_step(57, 0) == 50
    assert progress_step(100, 75) == 100
    assert progress_step(0, -1) == 0
    assert max_window(256 * 1024, 4, 1024 * 1024) == 4
    assert max_window(1024 * 1024, 4, 1024 * 1024) == 1
    assert max_window(4 * 1024 * 1024, 4, 1024 * 1024) == 1, "never below one chunk"
    assert max_window(4096, 4, 1024 * 1024) == 4
    assert chunk_message_size(4096, "lf/v1/f/blob/" + "a" * 64 + "/chunks") > 4096 + 13


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        TransferPlan(0, now=0.0)
    with pytest.raises(ValueError):
        TransferPlan(3, now=0.0, window=0)


def _manifest(model: bytes, chunk_size: int) -> Manifest:
    # only the model section matters to DownloadState; Manifest.from_dict would need the rest
    return Manifest({"model": model_section(model, chunk_size)})


def test_download_state_finds_exactly_the_chunks_that_verify(tmp_path):
    model = random.Random(3).randbytes(10_000)
    manifest = _manifest(model, 1024)
    sha = manifest.sha256
    state = DownloadState(tmp_path, sha)
    assert state.load_head() is None
    state.save_head(b"{}", b"sig")
    assert state.open(manifest) == set()
    assert state.part_path.stat().st_size == len(model), "preallocated"
    for index in (0, 3, 9):
        state.write_chunk(index, model[index * 1024:(index + 1) * 1024])
    state.write_chunk(5, b"\x00" * 1024)     # a torn or corrupted write
    state.close()

    again = DownloadState(tmp_path, sha)
    assert again.load_head() == (b"{}", b"sig")
    assert again.open(manifest) == {0, 3, 9}
    for index in set(range(10)) - {0, 3, 9}:   # a resumed fetch writes only what was missing
        again.write_chunk(index, model[index * 1024:(index + 1) * 1024])
    data = again.model()
    assert hashlib.sha256(data).hexdigest() == sha, "the chunks found on disk are part of the assembled model"
    again.discard()
    assert not (tmp_path / sha).exists()
