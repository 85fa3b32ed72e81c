"""``fastvec export --port N``: serve the statistics of every live FastVectorEnv instance of
this user to Prometheus (extra ``[metrics]``: prometheus-client), with no change to the
training script.

    scrape ──▶ Collector.collect() ──▶ instances.Registry.scan() ──▶ Instance.workers()
                 (one look per scrape, under a lock: scrapes may come in parallel)

Every series carries ``instance`` (``fv<owner pid>_<hex>``) and, per worker, ``worker``
labels. Counters count over the slot's life (every generation of its process), so a
respawn never resets them; step latencies are a histogram over log2 buckets of
nanoseconds, from the worker's own measurement in C.
"""

from __future__ import annotations

import sys
import threading
from http.server import ThreadingHTTPServer

from fastvec import stats
from fastvec.instances import Registry

# the histogram's buckets shown: 2^10 ns (1 us) .. 2^36 ns (69 s); the rest lands in +Inf
_FIRST_BUCKET, _LAST_BUCKET = 9, 35
# restarts are counted by these reasons (recycles, planned, have their own counter)
_RESTART_REASONS = [name for name in stats.REASON_CODES if name != "recycle"]


class Collector:
    """A prometheus_client collector: one look at every live instance per scrape."""

    def __init__(self, registry: Registry | None = None):
        self.registry = registry if registry is not None else Registry()
        self.lock = threading.Lock()

    def describe(self):
        return []  # the series depend on what is live at each scrape

    def collect(self):
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                            HistogramMetricFamily)

        def counter(name, doc, extra=()):
            return CounterMetricFamily(name, doc, labels=["instance", "worker", *extra])

        def gauge(name, doc, labels=("instance", "worker")):
            return GaugeMetricFamily(name, doc, labels=list(labels))

        info = gauge("fastvec_instance_info", "A live FastVectorEnv instance (value 1).",
                     ("instance", "owner_pid", "layout_version"))
        envs = gauge("fastvec_instance_envs", "Envs of the instance.", ("instance",))
        refused = gauge("fastvec_instance_refused", "A live instance whose statistics this "
                        "fastvec cannot read (value 1).", ("instance", "error"))
        winfo = gauge("fastvec_worker_info", "A worker slot (value 1): its process and envs.",
                      ("instance", "worker", "pid", "envs"))
        state = gauge("fastvec_worker_state", "The slot's state (1 for the current one).",
                      ("instance", "worker", "state"))
        gen = gauge("fastvec_worker_generation", "How many times the slot's process was "
                    "replaced (restarts and recycles).")
        requests = counter("fastvec_worker_requests", "Requests the slot's workers finished.")
        steps = counter("fastvec_worker_steps", "Step requests the slot's workers finished.")
        episodes = counter("fastvec_worker_episodes", "Episodes the slot's envs finished.")
        restarts = counter("fastvec_worker_restarts", "Restarts of the slot's process, by "
                           "reason.", ("reason",))
        recycles = counter("fastvec_worker_recycles", "Planned replacements of the slot's "
                           "process (episode or memory limit).")
        latency = HistogramMetricFamily(
            "fastvec_worker_step_latency_seconds", "How long the worker took for a step "
            "request (measured in the worker).", labels=["instance", "worker"])
        rss = gauge("fastvec_worker_rss_bytes", "Resident memory of the slot's process.")
        beat = gauge("fastvec_worker_heartbeat_age_seconds", "Seconds since the worker's "
                     "latest heartbeat.")
        failed = gauge("fastvec_worker_last_failure_timestamp_seconds", "When the slot's "
                       "latest failure happened (seconds since the epoch).")
        with self.lock:
            ready, refusals = self.registry.scan()
            looks = [(inst, inst.workers()) for inst in ready]
        for r in refusals:
            refused.add_metric([r.instance, r.error], 1)
        for inst, workers in looks:
            h = inst.header
            info.add_metric([inst.name, str(h.owner_pid), str(h.version)], 1)
            envs.add_metric([inst.name], h.num_envs)
            for ws in workers:
                labels = [inst.name, str(ws.worker)]
                winfo.add_metric([*labels, str(ws.pid or ""), ",".join(map(str, ws.envs))], 1)
                for name in stats.STATES.values():
                    state.add_metric([*labels, name], 1.0 if ws.state == name else 0.0)
                gen.add_metric(labels, ws.generation)
                requests.add_metric(labels, ws.requests)
                steps.add_metric(labels, ws.steps)
                episodes.add_metric(labels, ws.episodes)
                for reason in _RESTART_REASONS:
                    restarts.add_metric([*labels, reason], ws.restarts.get(reason, 0))
                recycles.add_metric(labels, ws.recycles)
                latency.add_metric(labels, _buckets(ws.step_hist), ws.step_seconds)
                rss.add_metric(labels, ws.rss_bytes)
                if ws.heartbeat_age is not None:
                    beat.add_metric(labels, ws.heartbeat_age)
                if ws.last_failure_time is not None:
                    failed.add_metric(labels, ws.last_failure_time)
        yield from (info, envs, refused, winfo, state, gen, requests, steps, episodes, restarts,
                    recycles, latency, rss, beat, failed)

    def close(self) -> None:
        with self.lock:
            self.registry.close()


def _buckets(hist) -> list:
    """Cumulative ``(le, count)`` pairs of a log2 histogram of ns, in seconds. Bucket b holds
    [2^b, 2^(b+1)) ns, so le = 2^(b+1) ns counts it (a duration of exactly 2^(b+1) ns, the
    one value of the next bucket at that bound, is counted one bucket late)."""
    out, seen = [], 0
    for b, n in enumerate(hist):
        seen += n
        if _FIRST_BUCKET <= b <= _LAST_BUCKET:
            out.append((repr(2.0 ** (b + 1) / 1e9), seen))
    out.append(("+Inf", sum(hist)))
    return out


def text(collector: Collector) -> str:
    """The collector's series in Prometheus' text format (what a scrape returns)."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry).decode("utf-8")


def run(*, port: int, addr: str = "127.0.0.1", once: bool = False) -> int:
    """``fastvec export``: serve ``/metrics`` on ``addr:port`` until interrupted (port 0:
    any free port; the address served is printed first), or print one scrape (``once``)."""
    try:
        from prometheus_client import CollectorRegistry
        from prometheus_client.exposition import MetricsHandler
    except ImportError:
        print("fastvec export needs prometheus-client: pip install 'fastvec[metrics]'",
              file=sys.stderr)
        return 2
    collector = Collector()
    try:
        if once:
            sys.stdout.write(text(collector))
            return 0
        registry = CollectorRegistry(auto_describe=False)
        registry.register(collector)
        server = ThreadingHTTPServer((addr, port), MetricsHandler.factory(registry))
        server.daemon_threads = True
        host, bound = server.server_address[:2]
        print(f"fastvec export: serving http://{host}:{bound}/metrics", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            return 0
        finally:
            server.server_close()
        return 0
    finally:
        collector.close()
