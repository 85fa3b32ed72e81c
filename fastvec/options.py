"""The knobs of a FastVectorEnv, validated once, in one frozen record.

``FastVectorEnv(env_fns, **keywords)`` takes them as keywords (the constructor style of
gymnasium's ``AsyncVectorEnv``) and builds one :class:`Options`; everything below it
(recovery, supervisor) reads that record instead of copies of its fields.
"""

from __future__ import annotations

from dataclasses import dataclass

from gymnasium.vector import AutoresetMode

from fastvec.infos import check_spec

ON_FAILURE = ("respawn", "raise")
RESUME = ("auto", "off")
ON_BUDGET_EXHAUSTED = ("raise", "disable")


# "auto" spins this long (us): covers a worker's cheap step or the parent's turn-around
# between steps; anything slower sleeps, where one wake-up is small next to the work.
AUTO_SPIN_US = 100.0

# step_timeout="auto": a request may run AUTO_HANG_FACTOR times the slowest one the worker
# completed, and never less than AUTO_HANG_FLOOR seconds. The floor is generous on
# purpose: a verdict kills a process, and a loaded 2-core machine can stall a healthy one
# for seconds; a deadlock is still caught within a minute with default options.
AUTO_HANG_FLOOR = 60.0
AUTO_HANG_FACTOR = 20.0


@dataclass(frozen=True)
class Options:
    """See ``FastVectorEnv``'s docstring (and the README's table) for each field."""

    context: str | None = None
    copy: bool = True
    autoreset_mode: AutoresetMode = AutoresetMode.NEXT_STEP
    envs_per_worker: int = 1
    on_failure: str = "respawn"
    on_budget_exhausted: str = "raise"
    heartbeat_interval: float = 0.05
    heartbeat_timeout: float = 5.0
    step_timeout: float | str | None = "auto"
    start_timeout: float = 60.0
    max_restarts: int = 5
    restart_window: float = 60.0
    recycle_after_episodes: int | None = None
    max_worker_rss: int | None = None
    recycle_grace: float = 5.0
    ring_depth: int = 2
    max_payload_bytes: int = 1 << 30
    validate_actions: bool = True
    spin_us: float | str = "auto"
    info_spec: dict | None = None
    batch_size: int | None = None
    daemon: bool = True
    resume: str = "auto"
    max_replay_steps: int = 10_000
    snapshot_every: int | None = None
    crash_dir: str | None = None
    spares: int = 0

    def __post_init__(self):
        object.__setattr__(self, "autoreset_mode", AutoresetMode(self.autoreset_mode))
        object.__setattr__(self, "info_spec", check_spec(self.info_spec))
        if self.context not in (None, "fork", "spawn", "forkserver", "serial"):
            raise ValueError(f"context must be 'fork', 'spawn', 'forkserver', 'serial' or None, "
                             f"got {self.context!r}")
        if not 1 <= self.envs_per_worker <= 63:
            raise ValueError(f"envs_per_worker must be in 1..63, got {self.envs_per_worker}")
        for name, allowed in (("on_failure", ON_FAILURE),
                              ("on_budget_exhausted", ON_BUDGET_EXHAUSTED)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.ring_depth < 2:
            raise ValueError(f"ring_depth must be >= 2, got {self.ring_depth}")
        for name in ("heartbeat_interval", "heartbeat_timeout", "start_timeout",
                     "restart_window"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.heartbeat_timeout <= 2 * self.heartbeat_interval:
            raise ValueError("heartbeat_timeout must exceed two heartbeat intervals")
        if self.step_timeout != "auto" and self.step_timeout is not None and not (
                isinstance(self.step_timeout, (int, float)) and self.step_timeout > 0):
            raise ValueError(f"step_timeout must be 'auto', a number of seconds > 0 or None, "
                             f"got {self.step_timeout!r}")
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {self.max_restarts}")
        if self.recycle_grace < 0:
            raise ValueError(f"recycle_grace must be >= 0, got {self.recycle_grace}")
        if self.spin_us != "auto" and not (isinstance(self.spin_us, (int, float))
                                           and self.spin_us >= 0):
            raise ValueError(f"spin_us must be 'auto' or a number of microseconds >= 0, got "
                             f"{self.spin_us!r}")
        if self.max_payload_bytes < 1024:
            raise ValueError(f"max_payload_bytes must be >= 1024, got {self.max_payload_bytes}")
        if (self.recycle_after_episodes or self.max_worker_rss) and self.envs_per_worker != 1:
            raise ValueError("recycle_after_episodes / max_worker_rss replace a worker at an "
                             "episode boundary, which needs envs_per_worker=1")
        if self.batch_size is not None and (
                self.envs_per_worker != 1 or self.autoreset_mode != AutoresetMode.NEXT_STEP):
            raise ValueError("batch_size (send/recv) needs envs_per_worker=1 and "
                             "autoreset_mode=NEXT_STEP")

        if not (isinstance(self.spares, int) and self.spares >= 0):
            raise ValueError(f"spares must be an int >= 0, got {self.spares!r}")
        if self.spares and self.context == "serial":
            raise ValueError("spares are worker processes started ahead; context='serial' "
                             "runs the envs in this process: leave spares=0")

        if self.resume not in RESUME:
            raise ValueError(f"resume must be one of {RESUME}, got {self.resume!r}")
        if not (isinstance(self.max_replay_steps, int) and self.max_replay_steps >= 1):
            raise ValueError(f"max_replay_steps must be an int >= 1, got "
                             f"{self.max_replay_steps!r}")
        if self.snapshot_every is not None and not (
                isinstance(self.snapshot_every, int) and self.snapshot_every >= 1):
            raise ValueError(f"snapshot_every must be None or an int >= 1, got "
                             f"{self.snapshot_every!r}")
        if self.snapshot_every is not None and self.resume == "off":
            raise ValueError("snapshot_every shortens the replays of resume; with "
                             "resume='off' there are none: leave it None")

    @property
    def resuming(self) -> bool:
        """Whether the parent keeps the episode log and a lost worker's episodes are
        replayed (fastvec/resume.py)."""
        return self.resume != "off"

    def check_num_envs(self, num_envs: int) -> None:
        if num_envs < 1:
            raise ValueError("FastVectorEnv needs at least one env_fn")
        if self.batch_size is not None and not 1 <= self.batch_size <= num_envs:
            raise ValueError(f"batch_size must be in 1..{num_envs}, got {self.batch_size}")

    @property
    def recycling(self) -> bool:
        return bool(self.recycle_after_episodes or self.max_worker_rss)

    def spin_ns(self, cores: int) -> int:
        """Nanoseconds the parent and each worker spin before sleeping on a semaphore.

        Both sides spin before they block: waking a sleeping process costs 12-45 us on the
        VMs measured, more than the whole step of a cheap env. Spinners yield their core
        (sched_yield between rounds of polls), so a process with real work on it (another
        worker, another job) runs instead of waiting out a timeslice behind a spinner;
        measured on 2 cores, that kept 16 workers faster spinning than sleeping. With one
        usable core nothing can answer while we spin: sleep at once. ``cores`` counts the
        cores the parent and its workers may run on together (Supervisor.cores_in_reach,
        looked at again every 256 steps, so pinning them after construction counts); the
        workers follow the parent's choice. "auto" spins AUTO_SPIN_US; 0 always sleeps."""
        if self.context == "serial" or cores < 2:
            return 0
        us = AUTO_SPIN_US if self.spin_us == "auto" else float(self.spin_us)
        return int(us * 1000)

    def hang_bound(self, slowest_ns: int) -> float | None:
        """Seconds a worker's request (step, reset, call, set_attr) may run before the
        worker counts as hung, given the slowest request it completed (ns); None: never.
        "auto": AUTO_HANG_FACTOR x that, at least AUTO_HANG_FLOOR."""
        if self.step_timeout is None:
            return None
        if self.step_timeout == "auto":
            return max(AUTO_HANG_FLOOR, AUTO_HANG_FACTOR * slowest_ns / 1e9)
        return float(self.step_timeout)

    def describe_hang_bound(self, bound: float) -> str:
        if self.step_timeout == "auto":
            return (f"step_timeout='auto' ({bound:.1f} s: {AUTO_HANG_FACTOR:g}x the slowest "
                    f"request seen, at least {AUTO_HANG_FLOOR:g} s)")
        return f"step_timeout={self.step_timeout} s"
