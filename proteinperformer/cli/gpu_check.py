"""Validate an install on a GPU node in one command: ``pp-gpu-check --out DIR``.

Needs only the installed package (no checkout). Three sections, each failure confined to its section, so the whole
check stays under ~9 minutes on one H100/H200 and one failure does not hide the others:

1. ``tests``: the FAVOR+ checks of :mod:`proteinperformer.attention.checks` on CUDA (what ``tests/test_gpu.py``
   asserts): forward/backward in fp32, bf16 and fp16 against a float64 CPU reference, causal == prefix, padding
   invariance, decoding step == full causal.
2. ``train``: 20 bf16-mixed training steps of ``pp-train`` (``trainer=gpu``, each run its own process with a time
   limit) of ``experiment=paper_bid_1024`` (Performer-ReLU and ``model=transformer``) and
   ``experiment=paper_concat8192`` (Performer at batch 8; the Transformer at the largest of 8, 4, 2, 1 that fits);
   tokens/s and peak GPU memory from the throughput callback. The sequences: ``--fasta``, else the configured
   ``data.fasta_path`` when it exists from the current directory (the checkout's sample, from its root), else random
   protein-like sequences written to ``DIR/synthetic.fasta`` (the report says which).
3. ``bench``: :mod:`proteinperformer.attention.benchmark` on CUDA in fp32 and bf16, L = 1k … 64k, FAVOR+
   noncausal/causal vs SDPA (flash backend for bf16), with the longest L that fits for each.

Writes ``DIR/gpu_check.json`` and ``DIR/gpu_check.md``. Without CUDA it says what it skipped and exits 0.
``--quick`` runs the same mechanics on the CPU with tiny sizes (how CI tests this file).
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import subprocess
import sys
import time
from pathlib import Path

from proteinperformer.cli.common import Parser, run_command
from proteinperformer.files import CONFIG_DIR, write_text_atomic

BENCH_LENGTHS = [1024, 2048, 4096, 8192, 16384, 32768, 65536]
BENCH_METHODS = ["exact", "exact_causal", "favor", "favor_causal"]
BENCH_BUDGET_S = 5.0  # seconds of timed repeats per (method, L)


def _run(cmd: list[str], timeout: float) -> tuple[int, str, float]:
    """Run cmd; returns (exit code, last 4000 chars of output, seconds). 124 = timeout."""
    start = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return proc.returncode, (proc.stdout + proc.stderr)[-4000:], time.time() - start
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"").decode(errors="replace") + (err.stderr or b"").decode(errors="replace")
        return 124, out[-4000:], time.time() - start


def check_tests(device: str) -> dict:
    """Every FAVOR+ check on ``device``; counts of passed / failed and the checks themselves."""
    start = time.time()
    from proteinperformer.attention.checks import run_checks

    checks = run_checks(device)
    failed = sum(not c["passed"] for c in checks)
    seconds = round(time.time() - start, 1)
    return {"ok": failed == 0, "passed": len(checks) - failed, "failed": failed, "seconds": seconds, "checks": checks}


def synthetic_fasta(path: Path, n: int, seed: int = 0) -> Path:
    """``n`` random protein-like sequences (M, then uniform standard residues; 50 to 800 long) as FASTA at ``path``:
    the training section measures speed and memory, which do not depend on what the residues are."""
    from proteinperformer.inference.generate import write_fasta
    from proteinperformer.tokenizer import STANDARD_RESIDUES

    rng = random.Random(seed)
    records = [(f"synthetic_{i}", "M" + "".join(rng.choices(STANDARD_RESIDUES, k=rng.randint(49, 799))))
               for i in range(n)]
    return write_fasta(path, records)


def training_fasta(fasta: Path | None, out: Path, quick: bool) -> tuple[Path, str]:
    """The FASTA the training runs read, and where it comes from: ``fasta`` if given, else the configured
    ``data.fasta_path`` if it exists from the current directory, else synthetic sequences written into ``out``."""
    if fasta is not None:
        if not fasta.is_file():
            raise ValueError(f"{fasta}: no such FASTA file (--fasta)")
        return fasta.resolve(), "--fasta"
    from omegaconf import OmegaConf

    default = Path(OmegaConf.load(CONFIG_DIR / "data" / "fasta.yaml").fasta_path)
    if default.is_file():
        return default.resolve(), "data.fasta_path (the configured default)"
    path = synthetic_fasta(out / "synthetic.fasta", 400 if quick else 4000)
    return path.resolve(), f"synthetic: random sequences ({default} not found from {Path.cwd()}; give --fasta)"


def _train_once(name: str, overrides: list[str], fasta: Path, out: Path, quick: bool, timeout: float) -> dict:
    run_dir = (out / "train" / name).resolve()
    steps = 3 if quick else 20
    trainer = ["trainer=cpu", "trainer.precision=bf16-mixed"] if quick else ["trainer=gpu"]
    cmd = [sys.executable, "-m", "proteinperformer.cli.train", *overrides, *trainer, f"data.fasta_path={fasta}",
           f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}", "trainer.limit_val_batches=2",
           "trainer.log_every_n_steps=1", f"callbacks.throughput.log_every_n_steps={max(steps // 2, 1)}",
           "trainer.enable_progress_bar=false", "~callbacks.progress_bar", f"hydra.run.dir={run_dir}"]
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
    result["ok"] = code == 0 or result["oom"]  # running out of memory is a finding, not a failure
    return result


def check_training(out: Path, quick: bool, timeout: float, fasta: Path | None = None) -> dict:
    """The four training runs; the exact Transformer at 8192 backs off its batch size until it fits."""
    data, source = training_fasta(fasta, out, quick)
    print(f"training on {data} ({source})", flush=True)
    if quick:
        bid, concat = ["experiment=tiny"], ["experiment=tiny", "data.mode=concat", "data.chunk_len=128"]
    else:
        bid, concat = ["experiment=paper_bid_1024"], ["experiment=paper_concat8192"]
    runs = [
        _train_once("bid1024_performer_relu", [*bid, "model=performer_relu"], data, out, quick, timeout),
        _train_once("bid1024_transformer", [*bid, "model=transformer"], data, out, quick, timeout),
        _train_once("concat8192_performer_relu_b8", [*concat, "model=performer_relu", "data.batch_size=8"], data,
                    out, quick, timeout),
    ]
    for batch in (8, 4, 2, 1):
        r = _train_once(f"concat8192_transformer_b{batch}", [*concat, "model=transformer", f"data.batch_size={batch}"],
                        data, out, quick, timeout)
        r["batch_size"] = batch
        runs.append(r)
        if r["exit_code"] == 0 or not r.get("oom"):
            break
    return {"ok": all(r["ok"] for r in runs), "fasta": str(data), "fasta_source": source, "runs": runs}


def check_bench(device: str, quick: bool) -> dict:
    """The attention benchmark on ``device``, fp32 and bf16 (quick: fp32 at L=256); one run per dtype."""
    from proteinperformer.attention import benchmark

    entries = []
    for dtype in (["fp32"] if quick else ["fp32", "bf16"]):
        start = time.time()
        lengths = [256] if quick else BENCH_LENGTHS
        methods = ["exact", "favor_causal"] if quick else BENCH_METHODS
        entry: dict = {"dtype": dtype}
        try:
            results = [r for m in methods
                       for r in benchmark.time_lengths(m, lengths, device, dtype, repeats=3, budget_s=BENCH_BUDGET_S)]
            entry.update(longest=benchmark.longest(results), results=results,
                         ok=all(r.get("oom") or r["finite"] for r in results))
        except Exception as err:  # noqa: BLE001 - the report shows what broke; the other sections still run
            entry.update(ok=False, error=f"{type(err).__name__}: {err}")
        entry["seconds"] = round(time.time() - start, 1)
        entries.append(entry)
    return {"ok": all(e["ok"] for e in entries), "runs": entries}


def causal_vs_flash(bench: dict, L: int = 8192) -> float | None:
    """Time of FAVOR+ causal / SDPA causal at length L in bf16 (>1: FAVOR+ is slower)."""
    for entry in bench.get("runs", []):
        if entry["dtype"] == "bf16" and "results" in entry:
            by = {(r["method"], r["L"]): r for r in entry["results"] if not r.get("oom")}
            if ("favor_causal", L) in by and ("exact_causal", L) in by:
                return by[("favor_causal", L)]["seconds"] / by[("exact_causal", L)]["seconds"]
    return None


def _number(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def to_markdown(report: dict) -> str:
    """The report as markdown tables."""
    lines = [f"# GPU check: {report['device']}", "", f"torch {report['torch']}, CUDA {report['cuda_version']}, "
             f"{report['seconds']:.0f} s in all", ""]
    for name, why in report.get("skipped", {}).items():
        lines.append(f"- **{name}: skipped** ({why})")
    tests = report["sections"].get("tests")
    if tests:
        lines += ["", f"## FAVOR+ checks on {report['check_device']}", "",
                  f"passed {tests['passed']}, failed {tests['failed']} ({tests['seconds']} s)"]
        for c in tests["checks"]:
            if not c["passed"]:
                why = c.get("message") or ", ".join(f"error {e:.3g} (tolerance {t:.3g})"
                                                    for e, t in zip(c["errors"], c["tolerances"], strict=True))
                lines.append(f"- failed: {c['name']}: {why}")
    train = report["sections"].get("train")
    if train:
        steps = 3 if report["quick"] else 20
        lines += ["", f"## Training, {steps} steps, bf16-mixed", "", f"sequences: {train['fasta']} "
                  f"({train['fasta_source']})", "", "| run | exit | tokens/s | peak GiB | s |", "|---|---|---|---|---|"]
        for r in train["runs"]:
            status = "ok" if r["exit_code"] == 0 else ("OOM" if r.get("oom") else f"failed ({r['exit_code']})")
            lines.append(f"| {r['name']} | {status} | {_number(r.get('tokens_per_sec'), '.0f')} | "
                         f"{_number(r.get('peak_gib'), '.1f')} | {r['seconds']} |")
    for entry in report["sections"].get("bench", {}).get("runs", []):
        lines += ["", f"## Attention fwd+bwd, {entry['dtype']} (seconds, peak GiB)", ""]
        if "results" not in entry:
            lines.append(f"failed: {entry['error']}")
            continue
        lengths = sorted({r["L"] for r in entry["results"]})
        lines += ["| method | " + " | ".join(map(str, lengths)) + " |", "|---" * (len(lengths) + 1) + "|"]
        for method in dict.fromkeys(r["method"] for r in entry["results"]):
            by = {r["L"]: r for r in entry["results"] if r["method"] == method}
            cells = ["-" if L not in by else "OOM" if by[L].get("oom") else
                     f"{by[L]['seconds']:.4f} ({_number(by[L]['peak_gib'], '.2f')})" for L in lengths]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append("longest L that fits: " + ", ".join(f"{m} {L}" for m, L in entry["longest"].items()))
    ratio = report.get("favor_causal_over_sdpa_causal_8192_bf16")
    if ratio is not None:
        lines += ["", f"FAVOR+ causal / SDPA-flash causal at L=8192, bf16: {ratio:.2f}× the time"]
    return "\n".join(lines) + "\n"


def create_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="pp-gpu-check", description=__doc__.splitlines()[0])
    parser.add_out("output folder", default=Path("results/gpu"))
    parser.add_argument("--quick", action="store_true", help="tiny CPU run of the same mechanics (no CUDA needed)")
    parser.add_argument("--sections", nargs="+", choices=["tests", "train", "bench"],
                        default=["tests", "train", "bench"], help="which checks to run")
    parser.add_argument("--fasta", type=Path, default=None,
                        help="sequences for the training section (default: data.fasta_path if it exists from the "
                             "current directory, else random sequences written to OUT/synthetic.fasta)")
    parser.add_argument("--timeout", type=float, default=150, help="seconds per training run")
    return parser


def run(args: argparse.Namespace) -> dict:
    """Run the chosen sections; returns the report (also written to OUT/gpu_check.json and .md)."""
    start = time.time()
    import torch

    cuda = torch.cuda.is_available()
    device = "cpu" if args.quick else "cuda"
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"device": torch.cuda.get_device_name() if cuda else "CPU (no CUDA device)", "torch": torch.__version__,
              "cuda_version": torch.version.cuda, "quick": args.quick, "check_device": device, "sections": {},
              "skipped": {}}
    if not cuda and not args.quick:
        for section in args.sections:
            report["skipped"][section] = "no CUDA device visible to torch"
            print(f"skipped {section}: no CUDA device visible to torch {torch.__version__}")
    else:
        checks = {"tests": lambda: check_tests(device),
                  "train": lambda: check_training(args.out, args.quick, args.timeout, args.fasta),
                  "bench": lambda: check_bench(device, args.quick)}
        for section in args.sections:
            print(f"running {section} ...", flush=True)
            report["sections"][section] = checks[section]()
        report["favor_causal_over_sdpa_causal_8192_bf16"] = causal_vs_flash(report["sections"].get("bench", {}))
    report["seconds"] = time.time() - start
    for name, text in (("gpu_check.json", json.dumps(report, indent=2) + "\n"), ("gpu_check.md", to_markdown(report))):
        write_text_atomic(args.out / name, text)
    print(to_markdown(report))
    print(f"wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.md'}")
    return report


def failed_sections(report: dict) -> list[str]:
    """Sections that failed (a check over its tolerance or that raised, a training run that failed for a reason
    other than running out of memory, a benchmark that raised or gave non-finite output)."""
    return [name for name, result in report["sections"].items() if not result["ok"]]


def run_and_judge(args: argparse.Namespace) -> dict:
    """:func:`run`, then fail (one line) when a section failed."""
    report = run(args)
    if failed := failed_sections(report):
        raise SystemExit(f"error: {', '.join(failed)} failed; see {args.out / 'gpu_check.md'}")
    return report


def main(argv: list[str] | None = None) -> None:
    """Console entry point ``pp-gpu-check``."""
    run_command(run_and_judge, create_parser(), argv)


if __name__ == "__main__":
    main()
