"""A replica process killed mid-trace: nothing is silently lost.

Open-loop traffic (non-streamed and streamed, all best effort so that none is refused) runs
against the two-replica deployment; a replica's actor is killed (``ray.kill``: the process
ends at once, as in a crash) while requests run on it. Then:
- every request sent has exactly one answer (sent == answered);
- every non-streamed request, and every stream that had sent no token yet, succeeds, on the
  other replica if need be (the ingress retries it);
- a stream that had already sent tokens ends with an error event that says so;
- Serve starts a new replica in place of the dead one, which serves again.
"""

from __future__ import annotations

import threading
import time

from ray import serve

from .conftest import APP
from .reliability_helpers import (
    completion_body, engine_stats, kill_replica, replica_actor_name, run_open_loop, tally, wait_until,
)

RATE_RPS = 8.0
MAX_TOKENS = 160  # long enough that several run on each replica when it dies
DURATION_S = 14.0
KILL_AT_S = 5.0


def body(i: int) -> dict:
    # every third streamed
    return completion_body(i, max_tokens=MAX_TOKENS, best_effort=True, stream=i % 3 == 0)


def test_killing_a_replica_mid_trace_loses_no_request(idle):
    url = idle.url
    killed: dict = {}

    def kill_when_busy() -> None:
        time.sleep(KILL_AT_S)
        stats = wait_until(lambda: (s := engine_stats(url))["cpu-0"]["num_running"] >= 2 and s, 10, 0.05)
        killed["running_at_kill"] = stats["cpu-0"]["num_running"] if stats else None
        killed["actor"] = kill_replica(APP, "cpu-0")
        killed["at"] = time.monotonic()

    killer = threading.Thread(target=kill_when_busy)
    killer.start()
    outcomes = run_open_loop(url, RATE_RPS, DURATION_S, body, timeout_s=120)
    killer.join()
    t = tally(outcomes)
    print(f"\nreplica kill: sent {t.sent}, answered {t.answered}, by status {t.by_status}; "
          f"{killed['running_at_kill']} running on the killed replica")

    assert killed["running_at_kill"] and killed["running_at_kill"] >= 2
    assert t.sent == t.answered and t.lost == 0, [o for o in outcomes if o.kind == "lost"][:3]
    failed = [o for o in outcomes if o.kind != "ok"]
    # Only streams that had sent tokens may fail, and each says why.
    for o in failed:
        assert o.is_stream and o.num_stream_tokens > 0, o
        assert "replica" in o.message and "incomplete" in o.message, o.message
    complete = [o for o in outcomes if o.kind == "ok"]
    assert all(o.num_tokens == MAX_TOKENS for o in complete)
    assert not any(o.is_stream for o in failed if o.num_stream_tokens == 0)
    print(f"streams cut after tokens: {len(failed)}; completed: {len(complete)}")

    # Serve replaces the replica; it serves again.
    def replaced() -> bool:
        name = replica_actor_name(APP, "cpu-0")
        status = serve.status().applications[APP].deployments["replica-cpu-0"].status
        return name is not None and name != killed["actor"] and status == "HEALTHY"

    assert wait_until(replaced, 120, 0.5), "Serve did not replace the replica"
    back = wait_until(lambda: isinstance(engine_stats(url).get("cpu-0"), dict), 60, 0.5)
    recovered_s = time.monotonic() - killed["at"]
    assert back, "the new replica does not answer"
    after = run_open_loop(url, 4.0, 6.0, lambda i: completion_body(1000 + i, max_tokens=32, best_effort=True))
    assert all(o.kind == "ok" for o in after), tally(after)
    assert "cpu-0" in {o.replica for o in after}, "the new replica gets no requests"
    print(f"replica replaced and routed again {recovered_s:.1f} s after the kill")
