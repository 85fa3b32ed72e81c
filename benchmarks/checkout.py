"""Where the benchmarks run from: this checkout's paths and commits, and fastvec.

The scripts run from a source checkout (``python benchmarks/compare.py``); when fastvec is
not installed they import it from the checkout next to ``benchmarks/``, built in place.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent


def import_fastvec():
    """The fastvec package: installed, or else from this checkout (built in place)."""
    try:
        import fastvec
    except ImportError:
        sys.path.insert(0, str(REPO_ROOT))
        try:
            import fastvec
        except ImportError as exc:
            raise SystemExit(
                f"cannot import fastvec ({exc}); build it in place first:\n"
                f"  cd {REPO_ROOT.name} && python setup.py build_ext --inplace") from exc
    return fastvec


def git_commit(path: Path) -> str | None:
    """HEAD of the git work tree holding ``path`` (a worktree too), "+dirty" when it has
    uncommitted changes to tracked files; None when ``path`` is not in one."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(path), *args], capture_output=True,
                              text=True, timeout=10)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")
