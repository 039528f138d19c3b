"""Pieces shared by the reliability tests and ``scripts/soak.py``: an open-loop load generator
that records every request it sends and what came back, the replicas' memory, and finding a
replica's actor to kill it.

Every request ends as exactly one ``Outcome``: ``ok`` (200 with all its tokens), ``refused``
(429 with Retry-After and a message), ``error`` (another status, or a stream that ended with
an error event, with its message) or ``lost`` (no answer: a transport error or a timeout).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx

API_KEY = "reliability-test-key"
MODEL = "tiny-llada"


def auth_headers(key: str | None = API_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


@dataclass
class Outcome:
    index: int
    sent_s: float  # seconds after the load started
    latency_s: float
    kind: str  # "ok", "refused", "error", "lost"
    status: int | None = None
    message: str = ""
    retry_after: str | None = None
    slo_met: bool | None = None
    replica: str | None = None
    num_tokens: int = 0
    is_stream: bool = False
    num_stream_tokens: int = 0  # tokens a stream delivered before it ended


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q / 100 * (len(ordered) - 1)))))]


def completion_body(i: int, max_tokens: int = 32, **fields) -> dict[str, Any]:
    rng = random.Random(i)
    prompt = [rng.randrange(0, 250) for _ in range(rng.randrange(4, 24))]
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, **fields}


async def _send(client: httpx.AsyncClient, url: str, i: int, sent_s: float, body: dict,
                timeout_s: float) -> Outcome:
    start = time.monotonic()
    is_stream = bool(body.get("stream"))
    try:
        if is_stream:
            return await asyncio.wait_for(_send_stream(client, url, i, sent_s, body, start), timeout_s)
        r = await client.post(f"{url}/v1/completions", json=body, timeout=timeout_s)
    except Exception as exc:  # no answer at all: counted, never raised
        return Outcome(i, sent_s, time.monotonic() - start, "lost", message=repr(exc), is_stream=is_stream)
    latency = time.monotonic() - start
    return _classify(i, sent_s, latency, r.status_code, r.headers, r.content, body)


def _classify(i, sent_s, latency, status, headers, content, body) -> Outcome:
    try:
        data = json.loads(content)
    except ValueError:
        return Outcome(i, sent_s, latency, "error", status, f"not JSON: {content[:80]!r}")
    if status == 200:
        summary = data.get("dilaserve", {})
        tokens = data.get("usage", {}).get("completion_tokens", 0)
        complete = data["choices"][0]["finish_reason"] in ("stop", "length")
        return Outcome(i, sent_s, latency, "ok" if complete else "error", status, slo_met=summary.get("slo_met"),
                       replica=summary.get("replica"), num_tokens=tokens)
    message = (data.get("error") or {}).get("message", "") if isinstance(data, dict) else ""
    kind = "refused" if status == 429 else "error"
    return Outcome(i, sent_s, latency, kind, status, message, retry_after=headers.get("retry-after"))


async def _send_stream(client, url, i, sent_s, body, start) -> Outcome:
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            content = await r.aread()
            return _classify(i, sent_s, time.monotonic() - start, r.status_code, r.headers, content, body)
        tokens, error, last = 0, None, None
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line.removeprefix("data: "))
            if "error" in event:
                error = event["error"].get("message", "")
                continue
            tokens += len((event.get("dilaserve") or {}).get("token_ids") or [])
            if event["choices"][0].get("finish_reason"):
                last = event
    latency = time.monotonic() - start
    if error is not None or last is None:
        return Outcome(i, sent_s, latency, "error", 200, error or "the stream ended without a last chunk",
                       is_stream=True, num_stream_tokens=tokens)
    summary = last.get("dilaserve", {})
    return Outcome(i, sent_s, latency, "ok", 200, slo_met=summary.get("slo_met"), replica=summary.get("replica"),
                   num_tokens=tokens, is_stream=True, num_stream_tokens=tokens)


async def open_loop(url: str, rate_rps: Callable[[float], float] | float, duration_s: float,
                    body: Callable[[int], dict] = completion_body, *, headers: dict | None = None,
                    timeout_s: float = 120.0, seed: int = 0, on_tick: Callable[[float], None] | None = None,
                    stop: threading.Event | None = None) -> list[Outcome]:
    """Poisson arrivals at ``rate_rps`` (a number, or a function of seconds since the start)
    for ``duration_s``; waits for every answer. ``on_tick(t)`` runs about once a second."""
    rng = random.Random(seed)
    rate = rate_rps if callable(rate_rps) else (lambda _t, r=rate_rps: r)
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=256)
    async with httpx.AsyncClient(headers=headers if headers is not None else auth_headers(), limits=limits,
                                 timeout=timeout_s) as client:
        tasks: list[asyncio.Task] = []
        start = time.monotonic()
        next_s, next_tick = 0.0, 1.0
        i = 0
        while next_s < duration_s and not (stop is not None and stop.is_set()):
            now = time.monotonic() - start
            if on_tick is not None and now >= next_tick:
                on_tick(now)
                next_tick += 1.0
            if now < next_s:
                await asyncio.sleep(min(next_s - now, 0.05))
                continue
            tasks.append(asyncio.create_task(_send(client, url, i, now, body(i), timeout_s)))
            i += 1
            next_s += rng.expovariate(max(rate(next_s), 1e-6))
        return list(await asyncio.gather(*tasks))


def run_open_loop(*args, **kwargs) -> list[Outcome]:
    return asyncio.run(open_loop(*args, **kwargs))


@dataclass
class Tally:
    sent: int
    answered: int
    ok: int
    refused: int
    errors: int
    lost: int
    admitted_met: int
    by_status: dict[str, int] = field(default_factory=dict)

    @property
    def attainment(self) -> float:
        return self.admitted_met / self.ok if self.ok else float("nan")


def tally(outcomes: list[Outcome]) -> Tally:
    by_status: dict[str, int] = {}
    for o in outcomes:
        key = str(o.status) if o.status is not None else o.kind
        by_status[key] = by_status.get(key, 0) + 1
    count = lambda kind: sum(o.kind == kind for o in outcomes)  # noqa: E731
    return Tally(len(outcomes), len(outcomes) - count("lost"), count("ok"), count("refused"), count("error"),
                 count("lost"), sum(o.kind == "ok" and bool(o.slo_met) for o in outcomes), by_status)


def latency_summary_ms(values_s: list[float]) -> dict[str, float]:
    ms = [v * 1e3 for v in values_s]
    return {"n": len(ms), "p50": percentile(ms, 50), "p95": percentile(ms, 95), "p99": percentile(ms, 99),
            "max": max(ms) if ms else float("nan"), "mean": statistics.fmean(ms) if ms else float("nan")}


# -- processes ----------------------------------------------------------------------------------
def replica_pids(app_name: str) -> dict[str, int]:
    """Replica name -> pid of its Serve replica process on this machine (from the process titles
    Ray sets: ``ray::ServeReplica:<app>:replica-<name>``, with ``.<method>()`` appended while the
    actor runs a call; a CI run found the replica mid-call and missed it)."""
    found = {}
    marker = f"ServeReplica:{app_name}:replica-"
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline and cmdline.startswith("ray::"):
            name = re.match(r"[^\s.()]+", cmdline.split(marker, 1)[1]).group(0)
            found[name] = int(proc.name)
    return found


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def replica_actor_name(app_name: str, replica: str) -> str | None:
    """The named Serve actor of ``replica`` (one Serve deployment per replica)."""
    import ray

    prefix = f"SERVE_REPLICA::{app_name}#replica-{replica}#"
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["name"].startswith(prefix):
            return entry["name"]
    return None


def kill_replica(app_name: str, replica: str) -> str:
    """Kills the replica's actor process at once (as a crash would); returns its actor name."""
    import ray

    name = replica_actor_name(app_name, replica)
    assert name is not None, f"no actor for replica {replica} of {app_name}"
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    return name


def engine_stats(url: str, headers: dict | None = None) -> dict[str, dict]:
    r = httpx.get(f"{url}/v1/dilaserve/replicas", headers=headers if headers is not None else auth_headers(),
                  timeout=30)
    r.raise_for_status()
    return {name: (s["engine"] if isinstance(s, dict) else None) for name, s in r.json()["replicas"].items()}


def wait_until(predicate, timeout_s: float, interval_s: float = 0.2):
    end = time.monotonic() + timeout_s
    while True:
        try:
            value = predicate()
        except Exception:  # noqa: BLE001 - the server may be between states
            value = None
        if value or time.monotonic() > end:
            return value
        time.sleep(interval_s)


def is_idle(url: str) -> bool:
    stats = engine_stats(url)
    return all(s is not None and s["num_running"] == 0 and s["num_waiting"] == 0
               and s["pages_free"] == s["pages_total"] for s in stats.values())


def env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def closed_loop_rps(url: str, concurrency: int, duration_s: float, body: Callable[[int], dict],
                    headers: dict | None = None) -> float:
    """Completed requests per second with ``concurrency`` clients sending back to back (best
    effort, so none is refused): the replicas' throughput at that concurrency."""

    async def run() -> int:
        done = 0
        end = time.monotonic() + duration_s
        async with httpx.AsyncClient(headers=headers if headers is not None else auth_headers(), timeout=120) as c:
            async def worker(w: int) -> None:
                nonlocal done
                i = w
                while time.monotonic() < end:
                    r = await c.post(f"{url}/v1/completions", json={**body(i), "best_effort": True})
                    r.raise_for_status()
                    done += 1
                    i += concurrency

            await asyncio.gather(*(worker(w) for w in range(concurrency)))
        return done

    start = time.monotonic()
    done = asyncio.run(run())
    return done / (time.monotonic() - start)


@dataclass
class Sample:
    """One row of a load run's time series."""

    t_s: float
    rss_mib: dict[str, float | None]
    pages_free: dict[str, int | None]
    num_running: dict[str, int | None]
    num_waiting: dict[str, int | None]
    prediction_scale: dict[str, float | None] = field(default_factory=dict)


def sampler(url: str, app_name: str, samples: list[Sample], every_s: float = 5.0) -> Callable[[float], None]:
    """An ``on_tick`` for ``open_loop`` that records memory and queue state every ``every_s``."""
    next_s = [0.0]

    def tick(t: float) -> None:
        if t < next_s[0]:
            return
        next_s[0] = t + every_s
        try:
            stats = engine_stats(url)
        except Exception:  # noqa: BLE001 - a sample is skipped, the run goes on
            return
        pids = replica_pids(app_name)
        samples.append(Sample(
            t, {n: rss_mib(p) for n, p in pids.items()},
            {n: s["pages_free"] if s else None for n, s in stats.items()},
            {n: s["num_running"] if s else None for n, s in stats.items()},
            {n: s["num_waiting"] if s else None for n, s in stats.items()},
            {n: s["prediction_scale"] if s else None for n, s in stats.items()}))

    return tick


def window_rows(outcomes: list[Outcome], samples: list[Sample], window_s: float) -> list[dict[str, Any]]:
    """Per window of ``window_s``: requests sent, refused, attainment of the admitted, latency
    percentiles, and the replicas' memory and free pages at its end."""
    rows = []
    horizon = max([o.sent_s for o in outcomes] + [s.t_s for s in samples] + [0.0])
    start = 0.0
    while start <= horizon:
        end = start + window_s
        part = [o for o in outcomes if start <= o.sent_s < end]
        ok = [o for o in part if o.kind == "ok"]
        sample = next((s for s in reversed(samples) if s.t_s < end), None)
        lat = latency_summary_ms([o.latency_s for o in ok])
        rows.append({
            "t_s": round(start), "sent": len(part), "ok": len(ok), "refused": sum(o.kind == "refused" for o in part),
            "errors": sum(o.kind in ("error", "lost") for o in part),
            "attainment": round(sum(bool(o.slo_met) for o in ok) / len(ok), 3) if ok else None,
            "p50_ms": round(lat["p50"]), "p99_ms": round(lat["p99"]) if ok else None,
            "rss_mib": round(sum(v for v in sample.rss_mib.values() if v)) if sample and sample.rss_mib else None,
            "pages_free": sum(v for v in sample.pages_free.values() if v is not None) if sample else None,
            # The largest replica's measured prediction error (EngineCore.prediction_scale).
            "scale": round(max((v for v in sample.prediction_scale.values() if v), default=0.0), 2) if sample else None,
        })
        start = end
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no rows)"
    keys = list(rows[0])
    widths = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in keys}
    lines = ["  ".join(k.rjust(widths[k]) for k in keys)]
    lines += ["  ".join(str(r[k]).rjust(widths[k]) for k in keys) for r in rows]
    return "\n".join(lines)
