"""What one vector env holds of the operating system: its names, its main shared-memory
segment and its worker processes (the supervisor); started together, released by one call
that ``close()`` makes and a ``weakref.finalize`` backstop makes if ``close()`` never comes."""

from __future__ import annotations

import multiprocessing

from gymnasium.vector.utils import CloudpickleWrapper

from fastvec.errors import EnvSpacesError, RemoteTraceback
from fastvec.failure_reports import failure_error
from fastvec.layout import Plan
from fastvec.options import Options
from fastvec.shm import Names, Segment, new_prefix
from fastvec.supervisor import Supervisor


class Resources:
    """The env's names, main segment and supervisor; :meth:`cleanup` releases them."""

    def __init__(self):
        self.names = Names(new_prefix())
        self.supervisor: Supervisor | None = None
        self.main: Segment | None = None

    def open_main(self, plan: Plan) -> Segment:
        """Create the main segment, sized for ``plan``."""
        self.main = self.names.new_segment("main", plan.size)
        return self.main

    def start(self, opts: Options, plan: Plan, slots_envs: list, env_fns: list,
              single_spaces: tuple, observation_mode) -> Supervisor:
        """Start one worker per entry of ``slots_envs`` and wait until every one has built
        its envs; raises the first failure (an env's ``EnvSpacesError`` as it is)."""
        sup = self.supervisor = Supervisor(
            options=opts, prefix=self.names.prefix,
            ctx=None if opts.context == "serial" else multiprocessing.get_context(opts.context),
            names=self.names, main=self.main, plan=plan, slots_envs=slots_envs,
            env_fns=[CloudpickleWrapper(fn) for fn in env_fns], single_spaces=single_spaces,
            observation_mode="same" if observation_mode == "same" else "different")
        for slot in sup.slots:
            sup.start_process(slot)
        sup.start_watchdog()
        failures = sup.await_ready(sup.slots)
        if failures:
            slot, failure = min(failures.items(), key=lambda item: item[0].index)
            exc = failure.remote[0] if failure.remote else None
            if isinstance(exc, EnvSpacesError):  # as gymnasium: a RuntimeError
                raise exc from RemoteTraceback(failure.remote[1])
            raise failure_error(slot, failure, "while starting its envs")
        sup.fill_spares(now=True)  # after the workers: their builds come first
        return sup

    def cleanup(self, timeout: float | None = 0.0, terminate: bool = True) -> None:
        """Shut the workers down (in stages, bounded by ``timeout``), close the main
        segment and unlink every name; safe to call twice."""
        try:
            if self.supervisor is not None:
                self.supervisor.shutdown(timeout, terminate)
        finally:
            self.supervisor = None
            if self.main is not None:
                self.main.close()
                self.main = None
            self.names.unlink_all()
