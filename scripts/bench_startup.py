"""Start-up benchmark: how long ``pp-<command> --help`` of all 11 commands and the package imports take, each a
fresh Python process (``python -m proteinperformer.cli.<module> --help``, ``python -c "import ..."``).

    python scripts/bench_startup.py                            # this checkout, 5 repeats (~1 min)
    python scripts/bench_startup.py --baseline ../main         # also another checkout, interleaved in the same run

Writes ``results/bench_startup.json`` and prints a table: the median wall time of each command over ``--repeats``
runs (with ``--baseline``, its median and the ratio baseline / this). The target is < 1 s; the script exits 1 if a
median of this checkout exceeds ``--limit`` seconds (default 1.5: a loose check, the machine may be shared), so
the timing is asserted here, not in the test suite. ``-X importtime`` shows where a slow one spends its time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {  # pp-* command -> module under proteinperformer/cli
    "pp-train": "train", "pp-preprocess": "preprocess", "pp-embed": "embed", "pp-generate": "generate",
    "pp-probe": "probe", "pp-evaluate": "evaluate", "pp-convert": "convert", "pp-contacts": "contacts",
    "pp-attention-blosum": "attention_blosum", "pp-gpu-check": "gpu_check", "pp-score": "score",
}
IMPORTS = ("import proteinperformer", "from proteinperformer import embed", "import proteinperformer.progress",
           "import torch")  # the last: the floor of anything that runs a model


def cases() -> dict[str, list[str]]:
    """name -> the argv after ``python``."""
    out = {f"{cmd} --help": ["-m", f"proteinperformer.cli.{module}", "--help"] for cmd, module in COMMANDS.items()}
    out |= {code: ["-c", code] for code in IMPORTS}
    return out


def time_once(argv: list[str], root: Path) -> float:
    """Seconds of one fresh process running ``python argv`` with ``root`` first on the path (exit 0 required)."""
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *argv], cwd=root, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(argv)} in {root} exited {proc.returncode}: {proc.stderr[-500:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs per case (the median is reported)")
    parser.add_argument("--baseline", type=Path, default=None, help="another checkout to time in the same run")
    parser.add_argument("--limit", type=float, default=1.5, help="fail if a median of this checkout exceeds this")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench_startup.json")
    args = parser.parse_args()
    roots = {"this": ROOT} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
    times: dict[str, dict[str, list[float]]] = {name: {k: [] for k in roots} for name in cases()}
    for _ in range(args.repeats):  # interleaved: a load spike hits both checkouts alike
        for name, argv in cases().items():
            for key, root in roots.items():
                times[name][key].append(time_once(argv, root))
    rows = []
    for name, by_root in times.items():
        row = {"case": name, "median_s": round(statistics.median(by_root["this"]), 3),
               "runs_s": [round(t, 3) for t in by_root["this"]]}
        if "baseline" in by_root:
            base = statistics.median(by_root["baseline"])
            row |= {"baseline_median_s": round(base, 3), "baseline_runs_s": [round(t, 3) for t in by_root["baseline"]],
                    "speedup": round(base / statistics.median(by_root["this"]), 1)}
        rows.append(row)
    print(f"{'case':42s} {'median s':>9s}" + (f" {'baseline s':>11s} {'speed-up':>9s}" if args.baseline else ""))
    for r in rows:
        extra = f" {r['baseline_median_s']:11.2f} {r['speedup']:8.1f}x" if args.baseline else ""
        print(f"{r['case']:42s} {r['median_s']:9.2f}{extra}")
    slow = [r["case"] for r in rows if r["median_s"] > args.limit]
    report = {"host": platform.node(), "cpus": os.cpu_count(), "load_avg": os.getloadavg(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "python": platform.python_version(),
              "repeats": args.repeats, "baseline": str(args.baseline) if args.baseline else None,
              "target_s": 1.0, "limit_s": args.limit, "over_limit": slow, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    if slow:
        raise SystemExit(f"error: median over {args.limit} s: {', '.join(slow)}")


if __name__ == "__main__":
    main()
