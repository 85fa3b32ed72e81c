"""The ``fastvec`` command: look at this user's running FastVectorEnv instances from outside
the job, through what each publishes in its own shared memory (fastvec/stats.py).

    fastvec top [--once] [--json] [--interval S] [--window S]   per-worker view (top.py)
    fastvec export --port N [--addr A] [--once]                 Prometheus /metrics (export.py)
    fastvec replay BUNDLE [--in-process] [--timeout S] [--json] a crash bundle (bundles.py)

top and export only read: nothing in the training script changes, and nothing in the job
waits. replay runs a failure again from the bundle that ``crash_dir=`` left.
"""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastvec", description="Look at this user's running "
                                "FastVectorEnv instances from outside the job.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    top = sub.add_parser("top", help="a live per-worker view of this user's instances",
                         description="A live per-worker view of this user's running "
                         "FastVectorEnv instances: state, heartbeat, steps/s, step latency, "
                         "restarts, memory.")
    top.add_argument("--once", action="store_true", help="look once and exit")
    top.add_argument("--json", action="store_true",
                     help="JSON instead of the table (one object per look)")
    top.add_argument("--interval", type=float, default=1.0,
                     help="seconds between looks (default 1)")
    top.add_argument("--window", type=float, default=0.5,
                     help="with --once: seconds between the two looks that rates and "
                     "latencies cover (default 0.5)")
    export = sub.add_parser("export", help="serve the same numbers to Prometheus",
                            description="Serve the statistics of every live FastVectorEnv "
                            "instance of this user on /metrics (needs the [metrics] extra).")
    export.add_argument("--port", type=int, required=True,
                        help="TCP port to listen on (0: any free port, printed)")
    export.add_argument("--addr", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    export.add_argument("--once", action="store_true",
                        help="print one scrape to stdout and exit")
    replay = sub.add_parser("replay", help="run a crash bundle's failure again",
                            description="Rebuild the env of a crash bundle (crash_dir=...), "
                            "replay its episode and the failed request, and say whether the "
                            "fault came back and at which step.")
    replay.add_argument("bundle", help="a bundle directory (or its bundle.pkl)")
    replay.add_argument("--in-process", action="store_true",
                        help="run it in this process (for a debugger; a crash ends it)")
    replay.add_argument("--timeout", type=float, default=60.0,
                        help="seconds a step may take before it counts as hung (default 60)")
    replay.add_argument("--json", action="store_true", help="the outcome as JSON")
    return p


def _replay(args) -> int:
    import dataclasses
    import json

    from fastvec import bundles

    try:
        outcome = bundles.replay(args.bundle, in_process=args.in_process,
                                 timeout=args.timeout)
    except (OSError, ValueError) as exc:
        print(f"fastvec replay: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(dataclasses.asdict(outcome)) if args.json else outcome.text)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fastvec`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.command == "replay":
        return _replay(args)
    if args.command == "top":
        from fastvec import top

        if args.interval <= 0 or args.window < 0:
            print("fastvec top: --interval must be > 0 and --window >= 0", file=sys.stderr)
            return 2
        return top.run(once=args.once, as_json=args.json, interval=args.interval,
                       window=args.window)
    from fastvec import export

    return export.run(port=args.port, addr=args.addr, once=args.once)


if __name__ == "__main__":  # python -m fastvec.cli
    sys.exit(main())
