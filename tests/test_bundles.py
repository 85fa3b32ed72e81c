"""Crash bundles: a failure leaves what ``fastvec replay`` needs to run it again, and the
replay says whether the fault came back at the step it happened at. Real faults only."""

from __future__ import annotations

import functools
import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import envs as test_envs
from faults import CounterEnv, CrashesAtEnv
from fastvec import FastVectorEnv
from fastvec.bundles import load, replay

pytestmark = pytest.mark.timeout(120)
FASTVEC = str(Path(sys.executable).parent / "fastvec")  # the installed console script


def bundles_of(crash_dir: Path, env_index: int) -> list[Path]:
    return sorted(p for p in crash_dir.iterdir() if p.name.split("-")[-2] == f"env{env_index}")


def test_a_segfault_at_step_7_replays_to_a_segfault_at_step_7(tmp_path):
    env = FastVectorEnv([CounterEnv, CrashesAtEnv], crash_dir=tmp_path / "crashes")
    try:
        env.reset(seed=[4, 5])
        for _ in range(7):  # step 7 of env 1's episode segfaults (and again after replay)
            env.step(np.ones(2, np.int64))
    finally:
        env.close()
    first = bundles_of(tmp_path / "crashes", 1)[0]
    bundle = load(str(first))
    assert bundle["reason"] == "died" and bundle["op"] == "step" and bundle["env_index"] == 1
    assert bundle["built_by"] == "faults:CrashesAtEnv"
    assert len(bundle["episode"]["reward"]) == 6 and bundle["episode"]["start"].seed == 5
    assert "SIGSEGV" in (first / "summary.txt").read_text()
    out = subprocess.run([FASTVEC, "replay", str(first)], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "reproduced at step 7: SIGSEGV", out.stdout


def test_an_exception_replays_in_process_with_its_type(tmp_path):
    fns = [test_envs.AttrEnv, functools.partial(test_envs.StepRaisesEnv, 3)]
    env = FastVectorEnv(fns, crash_dir=tmp_path, resume="auto")
    try:
        env.reset(seed=0)
        for _ in range(3):
            env.step(np.zeros(2, np.int64))
    finally:
        env.close()
    first = bundles_of(tmp_path, 1)[0]
    outcome = replay(str(first), in_process=True)
    assert outcome.reproduced and outcome.step == 3 == outcome.expected_step
    assert outcome.what == "RuntimeError: step failed at t=3"


def test_a_kill_from_outside_does_not_reproduce(tmp_path):
    env = FastVectorEnv([CounterEnv] * 2, crash_dir=tmp_path)
    try:
        env.reset(seed=1)
        for _ in range(4):
            env.step(np.ones(2, np.int64))
        os.kill(env.health()[0]["pid"], signal.SIGKILL)
        env.step(np.ones(2, np.int64))
    finally:
        env.close()
    (only,) = bundles_of(tmp_path, 0)
    outcome = json.loads(subprocess.run(
        [FASTVEC, "replay", "--json", str(only)], capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)}).stdout)
    assert outcome["reproduced"] is False and outcome["expected_step"] == 5
    assert outcome["text"].startswith("did not reproduce")


def test_replay_refuses_what_is_not_a_bundle(tmp_path):
    (tmp_path / "bundle.pkl").write_bytes(pickle.dumps({"format": "other"}))
    out = subprocess.run([FASTVEC, "replay", str(tmp_path)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and "not a fastvec crash bundle" in out.stderr
