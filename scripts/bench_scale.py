"""Scale benchmark of the data path: does training memory and start-up time grow with the corpus?

    python scripts/bench_scale.py --sizes 1000000 4000000 16000000 --work /tmp/bench_scale \
        --out results/bench_scale.json

For each N (seeded, synthetic UniProt-like proteins: log-normal lengths, median ~300, residue frequencies
close to UniProt's): write the FASTA, build the token store with ``pp-preprocess --workers 2`` (timed), then
train a tiny MLM model from the store with the real ``train()`` (``data=uniprot_store``): single mode,
``max_len`` 256, batch 16, 2 DataLoader workers, ``--steps`` steps with one validation in the middle, and a
second time on 2 DDP ranks on CPU (gloo), each with 2 workers. While it runs, this script samples every
0.2 s the process tree of the run (the process, its DDP rank, their DataLoader workers) and records:

- peak summed PSS (``/proc/PID/smaps_rollup``: memory-mapped pages shared by several processes are
  divided among them, so the token store's pages are not counted twice);
- peak open files of any DataLoader worker (``/proc/PID/fd``);
- time from launch to the end of the first training step, and training steps/s after it (validation
  excluded), as the run's callback reports them.

The last lines fit each quantity linearly in N over the measured sizes (least squares) and extrapolate to
UniRef50 (65M sequences) and TrEMBL (250M). The machine may be shared: times are of one run each.
``--keep`` keeps the FASTA and stores (they are large: ~380 bytes and ~400 bytes per sequence).
``--data-start STORE ...`` times only the data path's start-up in one process (``data_start``).
``--sampler-state N ...`` measures only the packed and bucketed training samplers' memory per sequence and epoch
start on N memory-mapped lengths (``sampler_state``; writes ``results/bench_scale_samplers.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl

ROOT = Path(__file__).resolve().parents[1]
UNIREF50, TREMBL = 65_000_000, 250_000_000
# UniProt residue frequencies (%), for realistic unigram statistics
FREQS = dict(A=8.25, R=5.53, N=4.06, D=5.45, C=1.37, Q=3.93, E=6.75, G=7.07, H=2.27, I=5.96, L=9.66, K=5.84, M=2.42,
             F=3.86, P=4.70, S=6.56, T=5.34, W=1.08, Y=2.92, V=6.87)


# ---- synthetic corpus ------------------------------------------------------------------------------
def synth_lengths(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` UniProt-like protein lengths: log-normal (median ~300, long tail), clipped to 30..4,000 residues."""
    return np.clip(rng.lognormal(5.7, 0.65, n), 30, 4000).astype(np.int64)


def synth_fasta(path: Path, n: int, seed: int = 0, chunk: int = 200_000) -> int:
    """Write ``n`` records ``>SYN000000001`` + one sequence line; returns the file size. Vectorised: ~1 s per
    million records."""
    rng = np.random.default_rng(seed)
    letters = np.array([ord(a) for a in FREQS], dtype=np.uint8)
    weights = np.array(list(FREQS.values()))
    table = letters[np.searchsorted(np.cumsum(weights) / weights.sum(), (np.arange(256) + 0.5) / 256)]
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as handle:
        for lo in range(0, n, chunk):
            m = min(chunk, n - lo)
            lengths = synth_lengths(rng, m)
            size = 14 + lengths  # ">SYN" + 9 digits + "\n" + residues + "\n"
            starts = np.zeros(m, dtype=np.int64)
            np.cumsum(size[:-1], out=starts[1:])
            buf = table[rng.integers(0, 256, int(size.sum()), dtype=np.uint8)]
            ids = lo + 1 + np.arange(m, dtype=np.int64)
            digits = (ids[:, None] // 10 ** np.arange(8, -1, -1)) % 10 + ord("0")
            head = np.concatenate([np.tile(np.frombuffer(b">SYN", np.uint8), (m, 1)), digits.astype(np.uint8),
                                   np.full((m, 1), ord("\n"), np.uint8)], axis=1)
            buf[starts[:, None] + np.arange(14)] = head
            buf[starts + size - 1] = ord("\n")
            handle.write(buf.tobytes())
    tmp.replace(path)
    return path.stat().st_size


# ---- watching a process tree -------------------------------------------------------------------------
def children(pid: int) -> list[int]:
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                out += [int(c) for c in handle.read().split()]
    except OSError:
        pass
    return out


def tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo += children(p)
    return pids


def pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def open_files(pid: int, under: str) -> tuple[int, int]:
    """(open file descriptors of ``pid``, those on files under ``under``: the token store's)."""
    total = store = 0
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            total += 1
            try:
                store += os.readlink(f"/proc/{pid}/fd/{fd}").startswith(under)
            except OSError:
                pass
    except OSError:
        pass
    return total, store


def watch(cmd: list[str], env: dict, rank_pid_dir: Path, log: Path, timeout: float, store: Path) -> dict:
    """Run ``cmd``; sample PSS of its tree and open files of its DataLoader workers every 0.2 s."""
    t0 = time.time()
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
    peak_pss = peak_files = peak_store_files = 0
    peak_procs = 0
    while proc.poll() is None:
        if time.time() - t0 > timeout:
            proc.kill()
            raise RuntimeError(f"{cmd} ran over {timeout} s; see {log}")
        pids = tree(proc.pid)
        ranks = {int(p.read_text()) for p in rank_pid_dir.glob("rank*.pid")} | {proc.pid}
        peak_pss = max(peak_pss, sum(pss_kib(p) for p in pids))
        workers = [p for p in pids if p not in ranks]
        for total, on_store in (open_files(p, str(store)) for p in workers):
            peak_files, peak_store_files = max(peak_files, total), max(peak_store_files, on_store)
        peak_procs = max(peak_procs, len(pids))
        time.sleep(0.2)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}")
    return {"launch": t0, "peak_pss_bytes": peak_pss * 1024, "peak_worker_open_files": peak_files,
            "peak_worker_store_files": peak_store_files, "processes": peak_procs}


# ---- the training run (child mode) -----------------------------------------------------------------
class Timing(pl.Callback):
    """Writes this rank's pid (for the watcher), and on rank 0 the end time of the first training step and
    the training steps/s after it (validation excluded) to ``out_dir``."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.ends: list[float] = []
        self.val_seconds = 0.0
        self._val = 0.0

    def setup(self, trainer, pl_module, stage) -> None:
        (self.out_dir / f"rank{trainer.global_rank}.pid").write_text(str(os.getpid()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ends.append(time.time())

    def on_validation_start(self, trainer, pl_module) -> None:
        self._val = time.time()

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit":
            self.val_seconds += time.time() - self._val

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            span = self.ends[-1] - self.ends[0] - self.val_seconds
            record = {"first_step_end": self.ends[0], "steps": len(self.ends),
                      "steps_per_s": (len(self.ends) - 1) / span if span > 0 else None,
                      "val_seconds": self.val_seconds}
            (self.out_dir / "timing.json").write_text(json.dumps(record))


def child(store: str, out: str, devices: int, steps: int) -> None:
    """Train from ``store`` with the real train() (config as ``scripts/train.py`` composes it)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from proteinperformer.training.train import train

    overrides = [
        "experiment=tiny", "data=uniprot_store", f"data.store_path={store}", "data.max_len=256",
        "data.batch_size=16", "data.num_workers=2", f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps // 2}", "trainer.limit_val_batches=10", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "model.config.max_positions=256",
        "+callbacks.timing._target_=scripts.bench_scale.Timing", f"+callbacks.timing.out_dir={out}",
    ]
    if devices > 1:
        overrides += ["trainer=ddp", f"trainer.devices={devices}", "trainer.accelerator=cpu",
                      "trainer.precision=32-true"]
    import proteinperformer

    conf = Path(proteinperformer.__file__).resolve().parents[1] / "conf"  # the configs of the code under test
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.output_dir = out
    train(cfg)


# ---- the data path's start-up alone ---------------------------------------------------------------------
def data_start(store: str) -> dict:
    """Seconds to open ``store``, read the residue counts of the unigram baseline and get the first train and valid
    batch, in this process without workers (what of the time to the first step belongs to the data path); and the
    epoch-start pass of ``toks_per_batch=4096``."""
    from proteinperformer.data.datamodule import ProteinDataModule

    t0 = time.perf_counter()
    dm = ProteinDataModule.from_hparams(store_path=store, max_len=256, batch_size=16, num_workers=0)
    dm.setup()
    for split in ("train", "valid"):
        dm.splits[split].residue_counts(len(dm.alphabet))
    next(iter(dm.train_dataloader()))
    next(iter(dm.val_dataloader()))
    t1 = time.perf_counter()
    budget = ProteinDataModule.from_hparams(store_path=store, max_len=256, batch_size=16, num_workers=0,
                                            toks_per_batch=4096)
    budget.setup()
    next(iter(budget.train_dataloader()))
    t2 = time.perf_counter()
    n = sum(len(dm.splits[k]) for k in ("train", "valid", "test"))
    return {"store": store, "sequences": n, "data_start_seconds": round(t1 - t0, 3),
            "toks_per_batch_first_batch_seconds": round(t2 - t1, 3)}


# ---- the packed and bucketed samplers' state ----------------------------------------------------------------
def sampler_state(n: int, work: Path, max_len: int = 256, budget: int = 4096) -> dict:
    """Memory and epoch-start time of the training samplers on ``n`` sequences, in this process.

    The lengths are a memory map, as a token store's (``synth_lengths``, int32). For ``data.packing=true``
    (``PackedBatchSampler``, data.batch_size 16 x data.pool_batches 100 proteins per pool) and for bucketing by the
    same token budget (``LengthBucketBatchSampler``): the epoch-start pass (``len``: every pool packed once) and
    the first 100 batches; Python heap and numpy allocations traced by ``tracemalloc`` (peak during the pass, and
    what the sampler still holds after it), per sequence; and the pass's CPU seconds, timed without tracing.
    """
    import tracemalloc

    from proteinperformer.data.bucketing import LengthBucketBatchSampler, TokenCounts
    from proteinperformer.data.packing import PackedBatchSampler

    path = work / f"lengths_{n}.npy"
    np.save(path, synth_lengths(np.random.default_rng(0), n).astype(np.int32))
    lengths = np.load(path, mmap_mode="r")
    make = {"packed": lambda: PackedBatchSampler(lengths, max_len, budget, 16, 100, seed=0),
            "bucketed": lambda: LengthBucketBatchSampler(TokenCounts(lengths, max_len), 16, 100, seed=0,
                                                         toks_per_batch=budget)}
    row: dict = {"sequences": n, "max_len": max_len, "toks_per_batch": budget}
    for name, build in make.items():
        start = time.process_time()  # CPU time: the machine may be shared
        sampler = build()
        batches = len(sampler)
        first = iter(sampler)
        for _ in range(100):
            next(first)
        seconds = time.process_time() - start
        del sampler, first
        tracemalloc.start()
        sampler = build()
        len(sampler)
        first = iter(sampler)
        for _ in range(100):
            next(first)
        held, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        del sampler, first
        row[name] = {"batches": batches, "epoch_start_seconds": round(seconds, 2),
                     "epoch_start_us_per_sequence": round(1e6 * seconds / n, 3),
                     "held_bytes_per_sequence": round(held / n, 3), "peak_bytes_per_sequence": round(peak / n, 3),
                     "held_bytes": held, "peak_bytes": peak}
    path.unlink()
    return row


# ---- one size ----------------------------------------------------------------------------------------
def run_size(n: int, work: Path, steps: int, keep: bool, src: Path | None = None) -> dict:
    """Synthesise, preprocess and train at one size; ``src``: another checkout's code (a baseline)."""
    tag = f"{n // 1000}k" + ("-base" if src else "")
    folder = work / tag
    folder.mkdir(parents=True, exist_ok=True)
    fasta = work / f"synth_{n}.fasta"
    t = time.time()
    if not fasta.exists():
        synth_fasta(fasta, n)
    row: dict = {"sequences": n, "fasta_bytes": fasta.stat().st_size, "synth_seconds": round(time.time() - t, 1)}
    code = src or ROOT
    # the code under test first; this checkout second, for scripts.bench_scale.Timing
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{code}:{ROOT}", "PYTHONUNBUFFERED": "1"}
    store = folder / "store"
    t = time.time()
    subprocess.run([sys.executable, "-c", "from proteinperformer.cli.preprocess import main; main()", str(fasta),
                    "--out", str(store), "--workers", "2", "--chunk-mb", "4", "--quiet"],
                   env=env, check=True, cwd=code, stdout=subprocess.DEVNULL)
    row["preprocess_seconds"] = round(time.time() - t, 1)
    row["shards"] = len(json.loads((store / "manifest.json").read_text())["shards"])
    for devices in (1,) if src else (1, 2):  # the baseline: one process (its 2-rank run needs 2x the memory)
        run_dir = folder / f"train{devices}"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir()
        cmd = [sys.executable, str(ROOT / "scripts" / "bench_scale.py"), "--child", str(store), str(run_dir),
               str(devices), str(steps)]
        watched = watch(cmd, env, run_dir, run_dir / "log.txt", timeout=3600, store=store.resolve())
        timing = json.loads((run_dir / "timing.json").read_text())
        key = "single" if devices == 1 else "ddp2"
        row[key] = {
            "peak_pss_bytes": watched["peak_pss_bytes"],
            "peak_worker_open_files": watched["peak_worker_open_files"],
            "peak_worker_store_files": watched["peak_worker_store_files"],
            "processes": watched["processes"],
            "first_step_seconds": round(timing["first_step_end"] - watched["launch"], 2),
            "steps_per_s": round(timing["steps_per_s"], 2) if timing["steps_per_s"] else None,
        }
        print(json.dumps({tag: {key: row[key]}}), flush=True)
    if not keep:
        shutil.rmtree(store, ignore_errors=True)
    return row


def fit(rows: list[dict], get) -> dict:
    """Least-squares line ``a + b N`` through the measured sizes; b per sequence, extrapolations."""
    n = np.array([r["sequences"] for r in rows], dtype=float)
    y = np.array([get(r) for r in rows], dtype=float)
    b, a = np.polyfit(n, y, 1) if len(rows) > 1 else (0.0, y[0])
    return {"per_sequence": b, "intercept": a, "uniref50": a + b * UNIREF50, "trembl": a + b * TREMBL}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 4_000_000, 16_000_000])
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_scale"))
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench_scale.json")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--baseline-src", type=Path, default=None,
                        help="another checkout (e.g. the code before issue 20) also run at the smallest size")
    parser.add_argument("--keep", action="store_true", help="keep the FASTA files and stores")
    parser.add_argument("--data-start", nargs="+", metavar="STORE", default=None,
                        help="only time the data path's start-up on these stores (one process, no workers)")
    parser.add_argument("--sampler-state", type=int, nargs="+", metavar="N", default=None,
                        help="only measure the packed and bucketed samplers' memory and epoch start on N sequences")
    args = parser.parse_args()
    if args.sampler_state:
        args.work.mkdir(parents=True, exist_ok=True)
        rows = [sampler_state(n, args.work) for n in args.sampler_state]
        for r in rows:
            for name in ("packed", "bucketed"):
                x = r[name]
                print(f"{r['sequences']:>11,} {name:8} held {x['held_bytes_per_sequence']:8.3f} B/seq  peak "
                      f"{x['peak_bytes_per_sequence']:8.3f} B/seq  epoch start {x['epoch_start_seconds']:7.2f} s "
                      f"({x['epoch_start_us_per_sequence']:.2f} us/seq)", flush=True)
        out = args.out.with_name("bench_scale_samplers.json") if args.out.name == "bench_scale.json" else args.out
        out.write_text(json.dumps({"rows": rows}, indent=1))
        print(out)
        return
    if args.data_start:
        for store in args.data_start:
            print(json.dumps(data_start(store)), flush=True)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    result: dict = {}

    def save(baseline: dict | None = None) -> None:  # after every size: a late failure loses nothing
        fits = {
            f"{mode}_{name}": fit(rows, lambda r, m=mode, k=key: r[m][k])
            for mode in ("single", "ddp2")
            for name, key in (("pss_bytes", "peak_pss_bytes"), ("first_step_seconds", "first_step_seconds"))
        }
        result.update({"rows": rows, "fits": fits, "baseline": baseline,
                       "targets": {"pss_bytes_per_sequence": 24, "first_step_us_per_sequence": 2, "open_files": 64}})
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(args.out)

    for n in sorted(args.sizes):
        rows.append(run_size(n, args.work, args.steps, args.keep))
        print(json.dumps(rows[-1]), flush=True)
        save()
    if args.baseline_src:
        save(run_size(min(args.sizes), args.work, args.steps, args.keep, args.baseline_src))
    if not args.keep:
        for n in args.sizes:
            (args.work / f"synth_{n}.fasta").unlink(missing_ok=True)
    print_table(result)


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="bench_scale: one training process tree (2 DataLoader workers) and 2 DDP ranks")
    for col in ("sequences", "FASTA GB", "preprocess s", "shards", "PSS GiB (1 rank)", "PSS GiB (2 ranks)",
                "open files/worker (store)", "first step s (1 / 2 ranks)", "steps/s (1 / 2 ranks)"):
        table.add_column(col, justify="right")
    rows = result["rows"] + ([{**result["baseline"], "label": "before"}] if result.get("baseline") else [])
    for r in rows:
        s = r["single"]
        d = r.get("ddp2") or {k: float("nan") for k in s}
        table.add_row(f"{r['sequences']:,}" + (" (before)" if r.get("label") else ""),
                      f"{r['fasta_bytes'] / 1e9:.2f}", f"{r['preprocess_seconds']:.0f}", str(r["shards"]),
                      f"{s['peak_pss_bytes'] / 2**30:.2f}", f"{d['peak_pss_bytes'] / 2**30:.2f}",
                      f"{s['peak_worker_open_files']} ({s['peak_worker_store_files']})",
                      f"{s['first_step_seconds']:.1f} / {d['first_step_seconds']:.1f}",
                      f"{s['steps_per_s']} / {d['steps_per_s']}")
    Console().print(table)
    for name, f in result["fits"].items():
        if "seconds" in name:
            print(f"{name}: {f['per_sequence'] * 1e6:.3f} us/sequence; extrapolated: UniRef50 (65M) "
                  f"{f['uniref50']:,.0f} s, TrEMBL (250M) {f['trembl']:,.0f} s")
        else:
            print(f"{name}: {f['per_sequence']:.2f} bytes/sequence; extrapolated: UniRef50 (65M) "
                  f"{f['uniref50'] / 2**30:,.2f} GiB, TrEMBL (250M) {f['trembl'] / 2**30:,.2f} GiB")


if __name__ == "__main__":
    main()
