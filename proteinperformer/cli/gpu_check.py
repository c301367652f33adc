"""Validate an install on a GPU node in one command: ``pp-gpu-check --out DIR`` (or ``scripts/gpu_check.py``).

Three sections, each a subprocess with its own time limit, so the whole check stays under ~9 minutes on one
H100/H200 and one failure does not hide the others:

1. ``tests``: the CUDA tests (``pytest -m gpu tests/test_gpu.py``): FAVOR+ forward/backward on CUDA in fp32, bf16
   and fp16 against a float64 CPU reference, causal == prefix, padding invariance, decoding step == full causal.
2. ``train``: 20 bf16-mixed training steps through ``scripts/train.py`` (``trainer=gpu``) of
   ``experiment=paper_bid_1024`` (Performer-ReLU and ``model=transformer``) and ``experiment=paper_concat8192``
   (Performer at batch 8; the Transformer at the largest of 8, 4, 2, 1 that fits), on the bundled ``data/``;
   tokens/s and peak GPU memory from the throughput callback.
3. ``bench``: ``scripts/bench_attention.py`` on CUDA in fp32 and bf16, L = 1k … 64k, FAVOR+ noncausal/causal vs
   SDPA (flash backend for bf16), with the longest L that fits for each.

Writes ``DIR/gpu_check.json`` and ``DIR/gpu_check.md``. Without CUDA it says what it skipped and exits 0.
``--quick`` runs the same mechanics on the CPU with tiny sizes (how CI tests this file). Needs the repository
checkout (it runs the repository's tests/ and scripts/).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from proteinperformer.cli.common import Parser, run_command
from proteinperformer.files import PROJECT_ROOT as ROOT  # it runs the repository's tests/ and scripts/
from proteinperformer.files import write_text_atomic

BENCH_LENGTHS = [1024, 2048, 4096, 8192, 16384, 32768, 65536]
BENCH_METHODS = ["exact", "exact_causal", "favor", "favor_causal"]


def _run(cmd: list[str], timeout: float, env: dict | None = None) -> tuple[int, str, float]:
    """Run cmd from the repository root; returns (exit code, last 4000 chars of output, seconds). 124 = timeout."""
    start = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
        return proc.returncode, (proc.stdout + proc.stderr)[-4000:], time.time() - start
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"").decode(errors="replace") + (err.stderr or b"").decode(errors="replace")
        return 124, out[-4000:], time.time() - start


def check_tests(out: Path, quick: bool, timeout: float) -> dict:
    """pytest -m gpu; returns counts of passed / failed / skipped from its JUnit XML."""
    xml = out / "gpu_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py", f"--junitxml={xml}", "-p",
           "no:cacheprovider"]
    env = {"PP_GPU_TEST_DEVICE": "cpu"} if quick else {}
    if quick:
        cmd += ["-k", "padding"]
    code, tail, seconds = _run(cmd, timeout, env)
    result = {"exit_code": code, "seconds": round(seconds, 1)}
    if xml.is_file():
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        n, failed = int(suite.get("tests", 0)), int(suite.get("failures", 0)) + int(suite.get("errors", 0))
        skipped = int(suite.get("skipped", 0))
        result.update(passed=n - failed - skipped, failed=failed, skipped=skipped)
    if code != 0:
        result["output_tail"] = tail
    return result


def _train_once(name: str, overrides: list[str], out: Path, quick: bool, timeout: float) -> dict:
    run_dir = out / "train" / name
    steps = 3 if quick else 20
    trainer = ["trainer=cpu", "trainer.precision=bf16-mixed"] if quick else ["trainer=gpu"]
    cmd = [sys.executable, "scripts/train.py", *overrides, *trainer, f"trainer.max_steps={steps}",
           f"trainer.val_check_interval={steps}", "trainer.limit_val_batches=2", "trainer.log_every_n_steps=1",
           f"callbacks.throughput.log_every_n_steps={max(steps // 2, 1)}", "trainer.enable_progress_bar=false",
           "~callbacks.progress_bar", f"hydra.run.dir={run_dir}"]
    code, tail, seconds = _run(cmd, timeout)
    result = {"name": name, "overrides": overrides, "exit_code": code, "seconds": round(seconds, 1)}
    metrics_csv = run_dir / "csv" / "metrics.csv"
    if code == 0 and metrics_csv.is_file():
        rows = list(csv.DictReader(metrics_csv.open()))
        last = {k: float(v) for row in rows for k, v in row.items() if v not in ("", None) and k.startswith("perf/")}
        result.update(tokens_per_sec=last.get("perf/tokens_per_sec"), peak_gib=last.get("perf/max_memory_gib"))
        result.update(json.loads((run_dir / "metrics.json").read_text()))
    else:
        result["oom"] = "OutOfMemoryError" in tail or "out of memory" in tail
        result["output_tail"] = tail
    return result


def check_training(out: Path, quick: bool, timeout: float) -> list[dict]:
    """The four training runs; the exact Transformer at 8192 backs off its batch size until it fits."""
    if quick:
        bid, concat = ["experiment=tiny"], ["experiment=tiny", "data.mode=concat", "data.chunk_len=128"]
    else:
        bid, concat = ["experiment=paper_bid_1024"], ["experiment=paper_concat8192"]
    runs = [
        _train_once("bid1024_performer_relu", [*bid, "model=performer_relu"], out, quick, timeout),
        _train_once("bid1024_transformer", [*bid, "model=transformer"], out, quick, timeout),
        _train_once("concat8192_performer_relu_b8", [*concat, "model=performer_relu", "data.batch_size=8"], out,
                    quick, timeout),
    ]
    for batch in (8, 4, 2, 1):
        r = _train_once(f"concat8192_transformer_b{batch}", [*concat, "model=transformer", f"data.batch_size={batch}"],
                        out, quick, timeout)
        r["batch_size"] = batch
        runs.append(r)
        if r["exit_code"] == 0 or not r.get("oom"):
            break
    return runs


def check_bench(out: Path, quick: bool, timeout: float) -> list[dict]:
    """The attention benchmark on CUDA, fp32 and bf16; one JSON per dtype."""
    results = []
    for dtype in (["fp32"] if quick else ["fp32", "bf16"]):
        path = out / f"bench_attention_{dtype}.json"
        device = ["--device", "cpu"] if quick else ["--device", "cuda", "--dtype", dtype]
        lengths = ["256"] if quick else [str(L) for L in BENCH_LENGTHS]
        methods = ["exact", "favor_causal"] if quick else BENCH_METHODS
        cmd = [sys.executable, "scripts/bench_attention.py", *device, "--lengths", *lengths, "--methods", *methods,
               "--repeats", "3", "--budget", "5", "--out", str(path)]
        code, tail, seconds = _run(cmd, timeout)
        entry = {"dtype": dtype, "exit_code": code, "seconds": round(seconds, 1)}
        if code == 0 and path.is_file():
            payload = json.loads(path.read_text())
            entry.update(longest=payload["longest"], results=payload["results"])
        else:
            entry["output_tail"] = tail
        results.append(entry)
    return results


def causal_vs_flash(bench: list[dict], L: int = 8192) -> float | None:
    """Time of FAVOR+ causal / SDPA causal at length L in bf16 (>1: FAVOR+ is slower)."""
    for entry in bench:
        if entry["dtype"] == "bf16" and "results" in entry:
            by = {(r["method"], r["L"]): r for r in entry["results"] if not r.get("oom")}
            if ("favor_causal", L) in by and ("exact_causal", L) in by:
                return by[("favor_causal", L)]["seconds"] / by[("exact_causal", L)]["seconds"]
    return None


def to_markdown(report: dict) -> str:
    """The report as markdown tables."""
    lines = [f"# GPU check: {report['device']}", "", f"torch {report['torch']}, CUDA {report['cuda_version']}, "
             f"{report['seconds']:.0f} s in all", ""]
    for name, why in report.get("skipped", {}).items():
        lines.append(f"- **{name}: skipped** ({why})")
    tests = report["sections"].get("tests")
    if tests:
        lines += ["", "## CUDA tests (pytest -m gpu)", "",
                  f"passed {tests.get('passed', '?')}, failed {tests.get('failed', '?')}, "
                  f"skipped {tests.get('skipped', '?')} (exit {tests['exit_code']}, {tests['seconds']} s)"]
    train = report["sections"].get("train")
    if train:
        steps = 3 if report["quick"] else 20
        lines += ["", f"## Training, {steps} steps, bf16-mixed", "", "| run | exit | tokens/s | peak GiB | s |",
                  "|---|---|---|---|---|"]
        for r in train:
            tps = f"{r['tokens_per_sec']:.0f}" if r.get("tokens_per_sec") else "-"
            peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") else "-"
            status = "ok" if r["exit_code"] == 0 else ("OOM" if r.get("oom") else f"failed ({r['exit_code']})")
            lines.append(f"| {r['name']} | {status} | {tps} | {peak} | {r['seconds']} |")
    for entry in report["sections"].get("bench", []):
        lines += ["", f"## Attention fwd+bwd, {entry['dtype']} (seconds, peak GiB)", ""]
        if "results" not in entry:
            lines.append(f"failed (exit {entry['exit_code']})")
            continue
        lengths = sorted({r["L"] for r in entry["results"]})
        lines += ["| method | " + " | ".join(map(str, lengths)) + " |", "|---" * (len(lengths) + 1) + "|"]
        for method in sorted({r["method"] for r in entry["results"]}):
            by = {r["L"]: r for r in entry["results"] if r["method"] == method}
            cells = ["-" if L not in by else "OOM" if by[L].get("oom") else
                     f"{by[L]['seconds']:.4f} ({by[L]['peak_gib']:.2f})" for L in lengths]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append("longest L that fits: " + ", ".join(f"{m} {L}" for m, L in entry["longest"].items()))
    ratio = report.get("favor_causal_over_sdpa_causal_8192_bf16")
    if ratio is not None:
        lines += ["", f"FAVOR+ causal / SDPA-flash causal at L=8192, bf16: {ratio:.2f}× the time"]
    return "\n".join(lines) + "\n"


def create_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="pp-gpu-check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/gpu_check"), help="output folder")
    parser.add_argument("--quick", action="store_true", help="tiny CPU run of the same mechanics (no CUDA needed)")
    parser.add_argument("--sections", nargs="+", choices=["tests", "train", "bench"],
                        default=["tests", "train", "bench"])
    parser.add_argument("--timeout", type=float, default=150, help="seconds per subprocess")
    return parser


def run(args: argparse.Namespace) -> dict:
    """Run the chosen sections; returns the report (also written to OUT/gpu_check.json and .md)."""
    start = time.time()
    cuda = torch.cuda.is_available()
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"device": torch.cuda.get_device_name() if cuda else "CPU (no CUDA device)", "torch": torch.__version__,
              "cuda_version": torch.version.cuda, "quick": args.quick, "sections": {}, "skipped": {}}
    if not cuda and not args.quick:
        for section in args.sections:
            report["skipped"][section] = "no CUDA device visible to torch"
            print(f"skipped {section}: no CUDA device visible to torch {torch.__version__}")
    else:
        checks = {"tests": check_tests, "train": check_training, "bench": check_bench}
        for section in args.sections:
            print(f"running {section} ...", flush=True)
            report["sections"][section] = checks[section](args.out, args.quick, args.timeout)
        report["favor_causal_over_sdpa_causal_8192_bf16"] = causal_vs_flash(report["sections"].get("bench", []))
    report["seconds"] = time.time() - start
    for name, text in (("gpu_check.json", json.dumps(report, indent=2) + "\n"), ("gpu_check.md", to_markdown(report))):
        write_text_atomic(args.out / name, text)
    print(to_markdown(report))
    print(f"wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.md'}")
    return report


def failed_sections(report: dict) -> list[str]:
    """Sections with a subprocess that failed for a reason other than running out of memory."""
    failed = []
    for name, result in report["sections"].items():
        entries = result if isinstance(result, list) else [result]
        if any(e["exit_code"] != 0 and not e.get("oom") for e in entries):
            failed.append(name)
    return failed


def run_and_judge(args: argparse.Namespace) -> dict:
    """:func:`run`, then fail (one line) when a section failed for a reason other than running out of memory."""
    report = run(args)
    if failed := failed_sections(report):
        raise SystemExit(f"error: {', '.join(failed)} failed; see {args.out / 'gpu_check.md'}")
    return report


def main(argv: list[str] | None = None) -> None:
    """Console entry point ``pp-gpu-check``."""
    run_command(run_and_judge, create_parser(), argv)


if __name__ == "__main__":
    main()
