"""Compare two runs' ``metrics.json`` value by value (reproducibility and "no result changed" checks).

Usage: python scripts/compare_metrics.py RUN_A RUN_B [--models cnn3d set ...] [--atol 0]

Flattens both files to ``path -> value`` and counts the values present in both that differ by
more than ``--atol`` (timings and figure paths are left out: they differ between any two runs).
Exits 1 when any value differs, so it can guard a refactor.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

SKIP = ("time", "figures", "_s")


def flatten(obj, prefix: str = "") -> dict:
    """``{"/models/cnn3d/eps_std": 0.119, ...}`` for nested dicts and lists."""
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in flatten(val, f"{prefix}/{key}").items()}
    if isinstance(obj, list):
        return {k: v for i, val in enumerate(obj) for k, v in flatten(val, f"{prefix}[{i}]").items()}
    return {prefix: obj}


def differs(a, b, atol: float) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        if math.isnan(a) and math.isnan(b):
            return False
        return abs(a - b) > atol
    return a != b


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_a", type=Path)
    ap.add_argument("run_b", type=Path)
    ap.add_argument("--models", nargs="*", help="compare only these models' entries")
    ap.add_argument("--atol", type=float, default=0.0, help="largest absolute difference counted as equal")
    args = ap.parse_args()
    data = [json.loads((p / "metrics.json" if p.is_dir() else p).read_text()) for p in (args.run_a, args.run_b)]
    if args.models:
        data = [{"models": {m: d.get("models", {}).get(m, {}) for m in args.models}} for d in data]
    fa, fb = (flatten(d) for d in data)
    keys = [k for k in fa if k in fb and not any(s in k.rsplit("/", 1)[-1] for s in SKIP) and "figures" not in k]
    diff = [k for k in keys if differs(fa[k], fb[k], args.atol)]
    print(f"{len(keys)} values compared, {len(diff)} differ (atol {args.atol:g})")
    for k in diff[:20]:
        print(f"  {k}: {fa[k]!r} vs {fb[k]!r}")
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main())
