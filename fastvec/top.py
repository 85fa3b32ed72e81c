"""``fastvec top``: a live per-worker view of this user's running FastVectorEnv instances,
read from their own shared memory; ``fastvec top --once --json`` prints the same for scripts.

    instances.Registry.scan()          live instances (their locks), mapped read-only
        └─▶ Instance.workers()         a copy of each control block's statistics
              └─▶ Sampler.look()       rates, window percentiles and trends between looks
                    ├─▶ render()       a rich table per instance, refreshed ~1/s
                    └─▶ JSON           one object per look

It only reads: segments are mapped read-only, locks are tested without being held, and
nothing in the job ever waits for it. Steps/s and the p50/p99 step latencies cover the
time since the previous look (``--once`` looks twice, ``--window`` seconds apart); a
worker that made no step in it shows its whole life's percentiles (``latency_window_s``
None).
"""

from __future__ import annotations

import collections
import json
import sys
import time

from fastvec import stats
from fastvec.instances import Instance, Registry

RSS_SPAN = 60.0  # seconds of RSS samples behind a trend
_STATE_STYLE = {"serving": "green", "resumed": "green", "starting": "yellow",
                "replacing": "yellow", "disabled": "bold red", "new": "dim"}


class Sampler:
    """Looks at every live instance and remembers the previous look at each worker."""

    def __init__(self, registry: Registry | None = None):
        self.registry = registry if registry is not None else Registry()
        self._prev: dict[tuple, tuple[float, stats.WorkerStats]] = {}
        self._rss: dict[tuple, collections.deque] = {}

    def look(self) -> dict:
        """One look: ``{"time", "layout_version", "instances": [...], "refused": [...]}``,
        plain JSON types only."""
        now = time.monotonic()
        ready, refused = self.registry.scan()
        seen: set = set()
        out = []
        for inst in ready:
            rows = []
            for ws in inst.workers():
                key = (inst.name, ws.worker)
                seen.add(key)
                rows.append(self._row(key, now, ws))
            out.append(_instance(inst, rows))
        for key in [k for k in self._prev if k not in seen]:
            self._prev.pop(key)
            self._rss.pop(key, None)
        return {"time": time.time(), "layout_version": stats.VERSION, "instances": out,
                "refused": [{"instance": r.instance, "error": r.error} for r in refused]}

    def _row(self, key: tuple, now: float, ws: stats.WorkerStats) -> dict:
        prev = self._prev.get(key)
        self._prev[key] = (now, ws)
        rate = window = None
        hist = ws.step_hist
        if prev is not None and now > prev[0] and ws.steps >= prev[1].steps:
            window = now - prev[0]
            rate = (ws.steps - prev[1].steps) / window
            delta = stats.hist_delta(ws.step_hist, prev[1].step_hist)
            if sum(delta):
                hist = delta
            else:
                window = None
        rss = self._rss.setdefault(key, collections.deque())
        if prev is not None and prev[1].pid != ws.pid:
            rss.clear()  # a new process: its memory is its own trend
        rss.append((now, ws.rss_bytes))
        while now - rss[0][0] > RSS_SPAN:
            rss.popleft()
        trend = None
        if len(rss) > 1 and now > rss[0][0]:
            trend = (rss[-1][1] - rss[0][1]) / (now - rss[0][0])
        return {
            "worker": ws.worker, "pid": ws.pid, "envs": ws.envs, "state": ws.state,
            "generation": ws.generation, "heartbeat_age_s": ws.heartbeat_age,
            "busy_s": ws.busy_seconds, "steps": ws.steps, "steps_per_s": rate,
            "step_p50_ms": _ms(stats.percentile(hist, 50)),
            "step_p99_ms": _ms(stats.percentile(hist, 99)), "latency_window_s": window,
            "requests": ws.requests, "episodes": ws.episodes,
            "restarts": sum(ws.restarts.values()), "restart_reasons": dict(ws.restarts),
            "recycles": ws.recycles, "last_reason": ws.last_reason,
            "last_failure": ws.last_failure, "last_failure_time": ws.last_failure_time,
            "rss_bytes": ws.rss_bytes, "rss_trend_bytes_per_s": trend,
        }

    def close(self) -> None:
        self.registry.close()


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def _instance(inst: Instance, rows: list) -> dict:
    h = inst.header
    wanted, ready = inst.spares()
    return {"instance": inst.name, "owner_pid": h.owner_pid, "command": inst.command(),
            "created": h.created_ns / 1e9, "num_workers": h.num_workers,
            "num_envs": h.num_envs, "envs_per_worker": h.envs_per_worker,
            "layout_version": h.version, "spares_wanted": wanted, "spares_ready": ready,
            "workers": rows}


# -- the table ------------------------------------------------------------------------------------

def _num(x: float | None, fmt: str = "{:.0f}") -> str:
    return "-" if x is None else fmt.format(x)


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _trend(bps: float | None) -> str:
    if bps is None:
        return "-"
    per_min = bps * 60
    if abs(per_min) < 1024:
        return "flat"
    return f"{'↑ +' if per_min > 0 else '↓ -'}{_bytes(abs(per_min))}/min"


def _dur(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.1f} s"


def _beat(seconds: float | None) -> str:
    """A heartbeat's age: to the millisecond (beats come every 50 ms by default)."""
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"


def _envs(envs: list) -> str:
    if not envs:
        return "-"
    return str(envs[0]) if len(envs) == 1 else f"{envs[0]}-{envs[-1]}"


def render(report: dict):
    """The rich renderable of one look: a table per instance (the latest failure of each
    worker under it), then what was refused."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    parts: list = []
    now = report["time"]
    for inst in report["instances"]:
        title = (f"{inst['instance']}  pid {inst['owner_pid']}  {inst['num_envs']} envs on "
                 f"{inst['num_workers']} workers  up {_dur(now - inst['created'])}")
        if inst["spares_wanted"]:
            title += f"  spares {inst['spares_ready']}/{inst['spares_wanted']} ready"
        notes = [inst["command"] or ""]
        table = Table(title=title, title_justify="left", caption_justify="left",
                      box=box.SIMPLE_HEAD, show_edge=False, collapse_padding=True)
        for col in ("worker", "pid", "envs", "state", "beat", "steps/s", "p50", "p99",
                    "restarts", "last", "RSS", "trend"):
            table.add_column(col, justify="left" if col in ("state", "last") else "right",
                             no_wrap=True)
        for w in inst["workers"]:
            last = "-"
            if w["last_reason"]:
                last = f"{w['last_reason']}, {_dur(now - w['last_failure_time'])} ago"
                notes.append(f"worker {w['worker']}: {w['last_reason']}: {w['last_failure']}")
            table.add_row(
                str(w["worker"]), _num(w["pid"]), _envs(w["envs"]),
                Text(w["state"], style=_STATE_STYLE.get(w["state"], "")),
                _beat(w["heartbeat_age_s"]), _num(w["steps_per_s"], "{:,.0f}"),
                _dur(_sec(w["step_p50_ms"])), _dur(_sec(w["step_p99_ms"])),
                str(w["restarts"]), last, _bytes(w["rss_bytes"]),
                _trend(w["rss_trend_bytes_per_s"]))
        table.caption = "\n".join(n for n in notes if n)
        parts.append(table)
    if not report["instances"]:
        parts.append(Text("no live fastvec instances of this user", style="dim"))
    for r in report["refused"]:
        parts.append(Text(f"refused {r['instance']}: {r['error']}", style="red"))
    return Group(*parts)


def _sec(ms: float | None) -> float | None:
    return None if ms is None else ms / 1e3


# -- the command ----------------------------------------------------------------------------------

def run(*, once: bool = False, as_json: bool = False, interval: float = 1.0,
        window: float = 0.5) -> int:
    """``fastvec top``: see the module's docstring. Returns the exit status."""
    sampler = Sampler()
    told: set = set()
    try:
        if once:
            sampler.look()
            time.sleep(max(0.0, window))
            report = sampler.look()
            _tell_refused(report, told)
            if as_json:
                print(json.dumps(report), flush=True)
            else:
                _console().print(render(report))
            return 0
        if as_json:
            while True:
                report = sampler.look()
                _tell_refused(report, told)
                print(json.dumps(report), flush=True)
                time.sleep(interval)
        from rich.live import Live

        with Live(render(sampler.look()), console=_console(), refresh_per_second=4) as live:
            while True:
                time.sleep(interval)
                live.update(render(sampler.look()))
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # `fastvec top --json | head`
        return 0
    finally:
        sampler.close()


def _console():
    """A console as wide as the terminal, or 160 columns when printing to a pipe (rich's
    80 would cut the table)."""
    import shutil

    from rich.console import Console

    return Console(width=shutil.get_terminal_size((160, 24)).columns)


def _tell_refused(report: dict, told: set) -> None:
    """Say once on stderr why an instance is refused (the JSON has it at every look)."""
    for r in report["refused"]:
        if r["instance"] not in told:
            told.add(r["instance"])
            print(f"fastvec top: refused {r['instance']}: {r['error']}", file=sys.stderr)
