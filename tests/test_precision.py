"""Mixed precision and the GPU-facing settings, proven on their CPU twins.

CPU autocast (bf16 and fp16) does to FAVOR+'s custom autograd Functions what CUDA autocast does: it hands them
low-precision tensors and would run their matmuls in the low dtype. These tests check that every attention path
accumulates in float32 under autocast, that gradients match float32 within measured tolerances, that every
model × task × data mode trains under ``bf16-mixed`` (and ``16-mixed`` / ``bf16-true``, which Lightning accepts
on CPU), that ``torch.compile`` gives the eager loss, that reduced-precision inference stays close to float32,
and that impossible hardware requests fail in one line. DDP and resume under bf16 are in test_ddp.py and
test_resume.py.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from proteinperformer.attention import MultiheadSelfAttention, favor_attention, favor_step, gaussian_projection
from proteinperformer.model.precision import PrecisionError, check_inference_precision
from proteinperformer.training.precision import check_trainer
from proteinperformer.training.train import train
from tests.conftest import ROOT, tiny_config

LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}
# relative error vs float32 of a layer's output / parameter gradients under CPU autocast, measured over
# {favor softmax, favor relu, exact} × {causal, not}: bf16 ≤ 0.0036 / 0.011, fp16 ≤ 0.0005 / 0.0048
OUT_TOL = {"bf16": 1e-2, "fp16": 2e-3}
GRAD_TOL = {"bf16": 3e-2, "fp16": 1.5e-2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _qkv(dtype: torch.dtype, B=2, H=2, L=70, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, d, generator=g).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("low", ["bf16", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_favor_under_autocast_computes_in_float32(kernel: str, causal: bool, low: str) -> None:
    """Low-precision inputs under autocast give exactly the float32 computation on the same values, rounded
    once at the end to the autocast dtype: nothing inside (features, prefix sums, normaliser) ran in bf16/fp16."""
    dtype = LOW[low]
    q, k, v = _qkv(dtype)
    P = gaussian_projection(32, 16, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(2, 70, dtype=torch.bool)
    mask[1, 50:] = True
    with torch.autocast("cpu", dtype=dtype):
        out = favor_attention(q, k, v, P, kernel=kernel, causal=causal, key_padding_mask=mask, chunk_size=16)
    ref = favor_attention(q.float(), k.float(), v.float(), P, kernel=kernel, causal=causal, key_padding_mask=mask,
                          chunk_size=16)
    assert out.dtype == dtype  # autocast's convention for a matmul-like op
    assert torch.equal(out, ref.to(dtype))


@pytest.mark.parametrize("low", ["bf16", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize(("attention", "kernel"), [("favor", "softmax"), ("favor", "relu"), ("exact", "softmax")])
def test_layer_gradients_under_autocast_match_float32(attention: str, kernel: str, causal: bool, low: str) -> None:
    torch.manual_seed(0)
    layer = MultiheadSelfAttention(64, 4, attention=attention, kernel=kernel, num_features=64, causal=causal)
    x = torch.randn(2, 100, 64)
    mask = torch.zeros(2, 100, dtype=torch.bool)
    mask[1, 70:] = True
    weights = torch.linspace(-1, 1, 64)

    def run(autocast: bool):
        layer.zero_grad()
        with torch.autocast("cpu", dtype=LOW[low], enabled=autocast):
            y = layer(x, mask)
            (y.float()[~mask] * weights).sum().backward()  # backward inside autocast, the harder case
        return y.float().detach(), [p.grad.clone() for p in layer.parameters()]

    y32, g32 = run(False)
    y16, g16 = run(True)
    assert rel_err(y16[~mask], y32[~mask]) < OUT_TOL[low]
    for a, b in zip(g16, g32, strict=True):
        assert torch.isfinite(a).all() and rel_err(a, b) < GRAD_TOL[low]


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_decoding_step_under_autocast_equals_full_causal(kernel: str) -> None:
    q, k, v = _qkv(torch.bfloat16, L=24)
    P = gaussian_projection(32, 16, generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = favor_attention(q, k, v, P, kernel=kernel, causal=True, chunk_size=8)
        state, rows = None, []
        for t in range(24):
            out, state = favor_step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], P, state, kernel)
            rows.append(out)
    assert state.kv.dtype == torch.float32 and rows[0].dtype == torch.bfloat16
    assert torch.allclose(torch.cat(rows, 2).float(), full.float(), atol=1e-2, rtol=1e-2)


def test_attention_maps_under_autocast(tiny_checkpoint: Path) -> None:
    from proteinperformer.analysis import attention_maps
    from proteinperformer.checkpoints import load_model

    model = load_model(tiny_checkpoint)
    seq = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQ"
    ref = attention_maps(model, seq)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = attention_maps(model, seq)
    assert low.dtype == torch.float32 and low.shape == ref.shape
    assert rel_err(low, ref) < 0.03


# ----------------------------------------------------------------------------- training matrix

def _train(tmp_path: Path, overrides: list[str]) -> dict:
    return train(tiny_config(tmp_path, [
        "data.max_sequences=200", "trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "~callbacks.progress_bar", *overrides]))


def _finite(metrics: dict) -> bool:
    return all(math.isfinite(metrics[k]) for k in ("val_acc", "val_ppl"))


@pytest.mark.parametrize("mode", ["single", "concat"])
@pytest.mark.parametrize("task", ["mlm", "clm"])
@pytest.mark.parametrize("model", ["performer_relu", "performer_softmax", "transformer"])
def test_bf16_mixed_trains_every_model_task_and_mode(tmp_path: Path, model: str, task: str, mode: str) -> None:
    """The CPU twin of trainer=gpu: every combination a user can select trains and validates under bf16-mixed."""
    extra = ["data.chunk_len=96"] if mode == "concat" else []
    metrics = _train(tmp_path, [f"model={model}", f"task={task}", f"data.mode={mode}",
                                "trainer.precision=bf16-mixed", *extra])
    assert metrics["global_step"] == 3 and _finite(metrics)
    assert Path(metrics["last_checkpoint"]).is_file()


@pytest.mark.parametrize("task", ["mlm", "clm"])
@pytest.mark.parametrize("positions", ["sinusoidal", "rotary"])
@pytest.mark.parametrize("model", ["performer_relu", "performer_softmax", "transformer"])
def test_bf16_mixed_trains_every_position_encoding(tmp_path: Path, model: str, positions: str, task: str) -> None:
    """The matrix above uses learned positions (the default); the other two position encodings, every model and
    task, under bf16-mixed."""
    metrics = _train(tmp_path, [f"model={model}", f"task={task}", f"model.config.positions={positions}",
                                "trainer.precision=bf16-mixed"])
    assert metrics["global_step"] == 3 and _finite(metrics)


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-true"])
@pytest.mark.parametrize("model", ["performer_relu", "performer_softmax", "transformer"])
def test_other_precisions_lightning_accepts_on_cpu(tmp_path: Path, model: str, precision: str) -> None:
    """bf16-true runs as asked. 16-mixed is accepted, but Lightning runs it as bf16-mixed on CPU (it warns:
    "AMP with fp16 is not supported on CPU"), so CPU proves nothing about fp16 *training*; fp16 autocast of the
    FAVOR+ kernels themselves is covered above, and on CUDA by pp-gpu-check."""
    if precision == "16-mixed":
        with pytest.warns(UserWarning, match="Using `precision='bf16-mixed'` instead"):
            metrics = _train(tmp_path, [f"model={model}", "task=clm", f"trainer.precision={precision}"])
    else:
        metrics = _train(tmp_path, [f"model={model}", "task=clm", f"trainer.precision={precision}"])
    assert metrics["global_step"] == 3 and _finite(metrics)


def test_bf16_mixed_loss_tracks_float32(tmp_path: Path) -> None:
    """Same data, same init: bf16-mixed training follows the float32 run (validation ppl within 2%)."""
    runs = {p: _train(tmp_path / p, ["model=performer_softmax", "task=clm", f"trainer.precision={p}",
                                     "trainer.max_steps=10", "trainer.val_check_interval=10"])
            for p in ("32-true", "bf16-mixed")}
    assert runs["bf16-mixed"]["val_ppl"] == pytest.approx(runs["32-true"]["val_ppl"], rel=0.02)


def test_compiled_model_gives_the_eager_loss() -> None:
    """model.compile=true compiles the network in place (inductor); FAVOR+'s custom Functions compile with it."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from proteinperformer.training.lm import ProteinLM

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["model=performer_softmax", "task=clm", "model.compile=true"])
    assert instantiate(cfg.model, _convert_="all").hparams.compile
    config = dict(vocab_size=32, dim=32, depth=1, heads=2, ff_dim=64, num_features=16, causal=True, max_positions=64)
    torch.manual_seed(0)
    eager = ProteinLM(config, task="clm")
    compiled = ProteinLM(config, task="clm", compile=True)
    compiled.load_state_dict(eager.state_dict())  # keys are unchanged by compiling in place
    tokens = torch.randint(4, 24, (2, 48))
    batch = {"input_ids": tokens, "padding_mask": torch.zeros_like(tokens, dtype=torch.bool),
             "labels": torch.roll(tokens, -1, 1)}
    losses = []
    for lm in (eager, compiled):
        loss = lm.model_step(batch)["loss"]
        loss.backward()
        losses.append((loss.item(), lm.model.layers[0].attn.qkv.weight.grad.clone()))
    assert losses[1][0] == pytest.approx(losses[0][0], rel=1e-5)
    assert rel_err(losses[1][1], losses[0][1]) < 1e-4


# ----------------------------------------------------------------------------- inference precision

@pytest.mark.parametrize("precision", ["bf16", "16"])
def test_reduced_precision_embeddings_are_close_to_float32(tiny_checkpoint: Path, precision: str) -> None:
    from proteinperformer.checkpoints import load_model
    from proteinperformer.inference.embed import embed

    model = load_model(tiny_checkpoint)
    seqs = [("a", "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ"), ("b", "MSDNELKQLLEEVAKKLGVSPEEVLKALEEGHS" * 3)]
    ref = embed(model, seqs, layers=[1, -1], include=("per_tok", "mean"))
    low = embed(model, seqs, layers=[1, -1], include=("per_tok", "mean"), precision=precision)
    for label, _ in seqs:
        for layer in (1, -1):
            a, b = low[label]["per_tok"][layer], ref[label]["per_tok"][layer]
            assert a.dtype == torch.float32 and a.shape == b.shape
            assert rel_err(a, b) < (0.03 if precision == "bf16" else 0.005)
            assert not torch.equal(a, b)  # it really ran in low precision


def test_pp_embed_cli_precision(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """The CLI (Lightning predict) gives what embed() gives at the same precision, fp16 included."""
    from proteinperformer.checkpoints import load_model
    from proteinperformer.cli.embed import main
    from proteinperformer.inference.embed import embed
    from proteinperformer.inference.embed_files import read_embeddings

    fasta = tmp_path / "x.fasta"
    fasta.write_text(">p1\nMKTAYIAKQRQISFVKSHFSRQ\n>p2\nMSDNELKQLLEEVAKKLGV\n")
    model = load_model(tiny_checkpoint)
    for precision in ("32", "bf16", "16"):
        main([str(tiny_checkpoint), str(fasta), str(tmp_path / precision), "--precision", precision])
        api = embed(model, fasta, precision=precision)
        for label, record in read_embeddings(tmp_path / precision).items():
            assert torch.allclose(record["mean_representations"][2], api[label]["mean"][-1], atol=1e-6)
    low, ref = read_embeddings(tmp_path / "bf16"), read_embeddings(tmp_path / "32")
    for label in ("p1", "p2"):
        a, b = low[label]["mean_representations"][2], ref[label]["mean_representations"][2]
        assert rel_err(a, b) < 0.03 and not torch.equal(a, b)


# ----------------------------------------------------------------------------- bad hardware requests

def test_gpu_trainer_without_cuda_fails_in_one_line() -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "scripts/train.py", "trainer=gpu"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: a GPU was requested")
    assert "trainer=cpu" in proc.stderr and "Traceback" not in proc.stderr


def test_impossible_precisions_say_what_to_use(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(PrecisionError, match="use 16-mixed or bf16-mixed"):
        check_trainer("cpu", "16-true")
    with pytest.raises(PrecisionError, match="no CUDA device"):
        check_inference_precision("bf16", "cuda")
    with pytest.raises(PrecisionError, match="precision must be one of"):
        check_inference_precision("8", "cpu")
    # an old GPU (no bf16) and a CPU build without fp16 autocast, simulated
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100")
    with pytest.raises(PrecisionError, match="V100 has no bfloat16 support; use trainer.precision=16-mixed"):
        check_trainer("gpu", "bf16-mixed", 1)
    with pytest.raises(PrecisionError, match="4 GPUs requested but 1 visible"):
        check_trainer("gpu", "16-mixed", 4)
    check_trainer("gpu", "16-mixed", 1)  # fine
    monkeypatch.setattr("proteinperformer.training.precision.cpu_autocast_works", lambda dtype: False)
    with pytest.raises(PrecisionError, match="use trainer.precision=bf16-mixed or 32-true"):
        check_trainer("cpu", "16-mixed")


def test_pp_embed_on_missing_gpu_is_one_line(tiny_checkpoint: Path, tmp_path: Path) -> None:
    fasta = tmp_path / "x.fasta"
    fasta.write_text(">p1\nMKTAYIAKQ\n")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "proteinperformer.cli.embed", str(tiny_checkpoint), str(fasta),
                           "--out", str(tmp_path / "out"), "--device", "cuda", "--precision", "16"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and proc.stderr.strip().startswith("error: a GPU was requested")


# ----------------------------------------------------------------------------- layering

def test_attention_imports_without_lightning() -> None:
    """proteinperformer.attention is plain torch: it imports with Lightning made unimportable."""
    code = ("import sys; sys.modules['pytorch_lightning'] = None; sys.modules['lightning'] = None\n"
            "import proteinperformer.attention as a, torch\n"
            "a.redraw_projections(a.MultiheadSelfAttention(16, 2), seed=0, step=1)\n"
            "assert 'pytorch_lightning' not in [m for m in sys.modules if sys.modules[m] is not None]")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_analysis_clis_precision(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """pp-attention-blosum and pp-contacts --precision bf16 give the float32 numbers to within bf16 rounding."""
    import json

    from proteinperformer.cli import attention_blosum as blosum_cli
    from proteinperformer.cli import contacts as contacts_cli

    fasta, structures = ROOT / "data/uniprot_sample20k.fasta.gz", ROOT / "data/structures/pdb_chains_subset60.npz"
    results = {}
    for precision in ("32", "bf16"):
        out = tmp_path / precision
        blosum_cli.main([str(tiny_checkpoint), str(fasta), "--max-sequences", "4", "--crop-length", "50",
                         "--out", str(out), "--matrices", "BLOSUM62", "--precision", precision])
        contacts_cli.main([str(tiny_checkpoint), "--structures", str(structures), "--train-chains", "3",
                           "--max-sequences", "5", "--out", str(out), "--precision", precision])
        results[precision] = (json.loads((out / "attention_vs_blosum.json").read_text()),
                              json.loads((out / "contacts.json").read_text()))
    (b32, c32), (b16, c16) = results["32"], results["bf16"]
    assert b16["precision"] == "bf16" and c16["precision"] == "bf16"
    r32, r16 = (b["methods"]["weighted"]["model"]["overall"]["BLOSUM62"] for b in (b32, b16))
    assert r16 == pytest.approx(r32, abs=0.05) and r16 != r32
    assert c16["model"]["mean"]["long"]["L"] == pytest.approx(c32["model"]["mean"]["long"]["L"], abs=0.05)


def test_matmul_precision_setting_reaches_favor_float32_region():
    """trainer.matmul_precision sets torch's float32 matmul precision, and FAVOR+'s float32 region (which only turns
    autocast off) runs under it: "high" there means TF32 tensor cores on Ampere/Hopper GPUs. Bad values are refused."""
    from proteinperformer.attention.precision import _float32_region
    from proteinperformer.training.train import set_matmul_precision

    seen = _float32_region(lambda x: torch.get_float32_matmul_precision())
    before = torch.get_float32_matmul_precision()
    try:
        for precision in ("high", "medium", "highest"):
            set_matmul_precision(precision)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert seen(torch.ones(1)) == precision
        with pytest.raises(ValueError, match="trainer.matmul_precision='tf32'"):
            set_matmul_precision("tf32")
    finally:
        torch.set_float32_matmul_precision(before)
    from tests.conftest import tiny_config

    assert tiny_config(Path("/tmp")).trainer.matmul_precision == "highest"
    assert tiny_config(Path("/tmp"), ["trainer=gpu"]).trainer.matmul_precision == "high"
    assert tiny_config(Path("/tmp"), ["trainer=ddp"]).trainer.matmul_precision == "high"
