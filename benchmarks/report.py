"""What a benchmark prints and writes: console tables, rates, ratios, JSON.

Numbers are reported as measured (medians with min and max, ratios, efficiencies); whether
they meet a target is for the issue that sets the target, not for this code to decide.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def add_ratios(results: dict[str, dict], baseline: str) -> None:
    """``ratio_vs_<baseline>``: each median over the baseline contender's median."""
    base = results.get(baseline, {}).get("sps", {}).get("median")
    for res in results.values():
        med = res.get("sps", {}).get("median")
        ok = med and base and not res.get("reference")  # the reference is no vectorizer
        res["ratio_vs_" + baseline] = (med / base) if ok else None


def fmt_rate(x: float | None) -> str:
    if x is None:
        return "-"
    if x >= 1e6:
        return f"{x / 1e6:.2f}M"
    if x >= 1e4:
        return f"{x / 1e3:.0f}k"
    if x >= 1e3:
        return f"{x / 1e3:.1f}k"
    return f"{x:.0f}"


def fmt_share(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def cell_text(res: dict, baseline: str | None = None, efficiency: bool = False) -> str:
    """``median [min-max] (ratio x) efficiency%`` of one result, or ERROR."""
    if "error" in res:
        return "ERROR"
    s = res.get("sps")
    if not s:
        return "-"
    out = f"{fmt_rate(s['median'])} [{fmt_rate(s['min'])}-{fmt_rate(s['max'])}]"
    ratio = res.get("ratio_vs_" + baseline) if baseline else None
    if ratio is not None and not res.get("reference"):
        out += f" ({ratio:.1f}x)" if ratio >= 0.1 else f" ({ratio:.2g}x)"
    if efficiency and res.get("efficiency") is not None:
        out += f" {fmt_share(res['efficiency'])}"
    return out


def exc_text(exc: BaseException) -> str:
    msg = str(exc).strip()
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]
    line = "  ".join(str(h).rjust(w) if i else str(h).ljust(w)
                     for i, (h, w) in enumerate(zip(headers, widths)))
    out = [line, "  ".join("-" * w for w in widths)]
    for r in rows:
        out.append("  ".join(str(v).rjust(w) if i else str(v).ljust(w)
                             for i, (v, w) in enumerate(zip(r, widths))))
    return "\n".join(out)


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return repr(o)
