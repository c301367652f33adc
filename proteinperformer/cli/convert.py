"""``pp-convert``: turn a Transformer (an ESM-2 file, a Hugging Face ESM or GPT-2 directory, an exact-attention project
checkpoint) into a Performer checkpoint, and measure what the swap costs on your own sequences.

    pp-convert esm2_t6_8M_UR50D.pt --out esm2_8M_favor.ckpt --attention favor  # write a project checkpoint
    pp-convert esm2_t6_8M_UR50D.pt --report my_proteins.fasta                  # what FAVOR+ changes, per layer
    pp-train init_from=esm2_8M_favor.ckpt data.fasta_path=my.fasta            # fine-tune it (MLM)
    pp-convert iglm/trained_models/IgLM --out iglm_favor.ckpt --attention favor  # a GPT-2 directory + vocab.txt
    pp-convert --slim runs/tiny/<run>/checkpoints/last.ckpt --out model.ckpt    # drop the optimiser state
    pp-convert iglm/trained_models/IgLM-S --out iglm_oprf.ckpt --features oprf-dense --calibrate heavy.fasta
    pp-convert esm2_t6_8M_UR50D.pt --out esm2_8M_fit.ckpt --transfer my_proteins.fasta  # attention transfer

``--transfer FASTA`` (attention transfer, :mod:`proteinperformer.model.transfer`) trains only the FAVOR features
(per head a rescaling Ψ and projection W before the map; ``--kernel hedgehog``: Hedgehog's learned map) to mimic
each layer's exact attention on these sequences, layer by layer, and leaves every other weight as it was; the
checkpoint's config says ``transferred``. With ``--features oprf`` / ``oprf-rescaled`` the transfer starts from
FAVOR++ calibrated on the same sequences. The transfer also sees ``--transfer-augment`` (default 3) copies of each
sequence with 10% of the residues replaced at random (more inputs for the same exact targets: with 15 IgLM chains
the fit is limited by data). Finished layers are kept in ``.OUT.transfer/`` beside ``--out``, so a
stopped run resumes there. ``--transfer-steps`` (Adam steps per layer) defaults to the same budget of work for
every model (:func:`proteinperformer.model.transfer.default_steps`, ``options.TRANSFER_BUDGET``): 500 for IgLM-S
(3 layers, width 192) and 140 for the 13M IgLM (4 × 512) at m = 256, fewer for larger models, more for fewer
features; about 1.5 CPU-minutes on a laptop core for either IgLM.

``--window W`` (causal models, softmax kernel) keeps exact softmax attention over each token's last W keys and
uses the features only for older ones, one normaliser (LoLCATs' sliding-window hybrid,
:mod:`proteinperformer.attention.window`); W is stored in the checkpoint, and with ``--transfer`` the features are
trained with the window in place.

The checkpoint holds the weights, ``hyper_parameters.config`` and the alphabet; every command that takes a
checkpoint reads it (:func:`proteinperformer.checkpoints.load_model`). The FAVOR+ kernel is the source's own
(softmax for ESM-2, GPT-2 and any exact-attention checkpoint, whose attention is softmax; the checkpoint's own for a
FAVOR+ one) unless ``--kernel`` is given. The report is
described in :mod:`proteinperformer.evaluation.conversion`.

``--features oprf`` / ``oprf-rescaled`` / ``oprf-dense`` (FAVOR++, :mod:`proteinperformer.attention.oprf`;
``oprf-dense`` keeps the most without training) need ``--calibrate FASTA``: A and Ψ (M and c) per layer × head are
statistics of the exact model's queries and keys on the first ``--max-sequences`` sequences of FASTA (with the
model's tags for a tagged vocabulary, ``[HEAVY][HUMAN]EVQ...``), frozen in the checkpoint. Without ``--calibrate``
they are an error (uncalibrated OPRF would be FAVOR+ under another name).

``--slim SOURCE --out OUTPUT`` converts nothing: it copies a ``pp-train`` checkpoint with only what loading needs
(weights, hyper-parameters, alphabet, step counters; no optimiser or callback state), the way shipped checkpoints are
made, and
prints its size, parameter count, step and task (and, with ``--metrics``, the run's ``metrics.json``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from proteinperformer.cli.common import (
    Parser,
    add_attention_arguments,
    add_device_arguments,
    checked_device,
    run_command,
    summary,
)
from proteinperformer.files import write_json_atomic
from proteinperformer.options import DEFAULT_NUM_FEATURES


def create_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="pp-convert", description=summary(__doc__))
    parser.add_argument("source", type=Path,
                        help="ESM-2 .pt file, Hugging Face ESM or GPT-2 directory, or project .ckpt")
    parser.add_out("project checkpoint to write (.ckpt)", positional=True)
    add_attention_arguments(parser, default="favor")
    parser.set_defaults(num_features=DEFAULT_NUM_FEATURES)
    parser.add_argument("--seed", type=int, default=0, help="seed of the FAVOR+ projection draw")
    parser.add_argument("--window", type=int, default=None, metavar="W",
                        help="causal models, softmax kernel: exact softmax over each token's last W keys and FAVOR "
                             "features for older ones (sliding-window hybrid, stored in the checkpoint; with "
                             "--transfer the features train with it in place; 0: plain FAVOR; default: 16 with "
                             "--transfer on a causal model with the softmax kernel, else 0)")
    parser.add_argument("--transfer", type=Path, metavar="FASTA",
                        help="attention transfer: train the FAVOR features to mimic exact attention on these sequences")
    parser.add_argument("--transfer-steps", type=int,
                        help="transfer: Adam steps per layer (default: a fixed budget of work, 500 x 3 x 192 x 384 / "
                             "(layers x width x (features + 128)), rounded to tens, 50 to 2000: about 1.5 CPU-minutes "
                             "for IgLM-S or the 13M IgLM at m=256)")
    parser.add_argument("--transfer-augment", type=int, metavar="N",
                        help="transfer: also train on N copies of each sequence with 10%% of the residues replaced at "
                             "random (default 3, model.transfer.DEFAULT_AUGMENT; 0: the sequences only)")
    parser.add_argument("--distill-steps", type=int,
                        help="transfer: then Adam steps on all layers' features at once against the exact model's "
                             "output distributions (KL; default 0: none; with 15 IgLM chains it overfits, "
                             "see docs/gpt2_iglm.md)")
    parser.add_argument("--no-cls", action="store_true",
                        help="transfer: sequences without a leading <cls> (GPT-2 models such as IgLM)")
    parser.add_argument("--report", type=Path, metavar="FASTA", help="measure FAVOR+ vs exact on these sequences")
    parser.add_argument("--report-json", type=Path, help="also write the report as JSON here")
    parser.add_argument("--draws", type=int, default=3, help="projection draws the report averages over")
    parser.add_argument("--calibrate", type=Path, metavar="FASTA",
                        help="with --features oprf / oprf-rescaled / oprf-dense: calibrate them on these sequences "
                             "(default with --transfer: the transfer's)")
    parser.add_argument("--max-sequences", type=int, default=200,
                        help="report, calibration and transfer: first N sequences of FASTA")
    parser.add_argument("--slim", action="store_true",
                        help="copy a pp-train checkpoint SOURCE to --out without optimiser state (no conversion)")
    parser.add_argument("--metrics", type=Path, help="with --slim: the run's metrics.json, printed with the summary")
    add_device_arguments(parser)
    return parser


def print_report(r: dict) -> None:
    """The report of :func:`~proteinperformer.evaluation.conversion.report`, as ``pp-convert --report`` prints it."""
    features = r.get("features", "favor+")
    calibrated = f" calibrated on {r['calibration']}" if r.get("calibration") else ""
    print(f"{r['source']}: FAVOR+ ({r['kernel']} kernel, {r['num_features']} features, feature map {features}"
          f"{calibrated}, {r['draws']} draws) vs exact attention on {r['sequences']} sequences of {r['fasta']}")
    print("layer  relative error of the attention output (mean ± std over draws)")
    for i, (m, s) in enumerate(zip(r["layer_rel_error_mean"], r["layer_rel_error_std"], strict=True), start=1):
        print(f"{i:>5}  {m:.4f} ± {s:.4f}")
    what = r.get("objective", "masked-residue")
    print(f"{what} accuracy  exact {100 * r['exact_acc']:.2f}%   "
          f"FAVOR+ {100 * r['favor_acc']:.2f}%")
    print(f"perplexity               exact {r['exact_ppl']:.3f}   FAVOR+ {r['favor_ppl']:.3f}   "
          f"({r['masked_residues']} {'scored' if what == 'next-residue' else 'masked'} residues)")


def slim(args: argparse.Namespace) -> None:
    """``--slim``: write the slim copy and print what goes into a model card."""
    from proteinperformer.checkpoints import export_slim, load_model, read_torch

    if args.out is None or args.report is not None:
        raise ValueError("--slim copies SOURCE to --out: give both, and no --report")
    dst = export_slim(args.source, args.out)
    model, ckpt = load_model(dst), read_torch(dst)
    print(f"{dst}: {dst.stat().st_size / 2**20:.1f} MiB (from {args.source.stat().st_size / 2**20:.1f} MiB), "
          f"{model.num_parameters():,} parameters, step {ckpt.get('global_step')}, task "
          f"{ckpt['hyper_parameters'].get('task')}\nconfig: {model.config.to_dict()}")
    if args.metrics:
        print(json.dumps(json.loads(args.metrics.read_text()), indent=2))


def run(args: argparse.Namespace) -> None:
    """Write the converted checkpoint and/or print (and save) the report; or, with ``--slim``, the slim copy."""
    if args.slim:
        slim(args)
        return
    if args.metrics is not None:
        raise ValueError("--metrics goes with --slim")
    if args.out is None and args.report is None:
        raise ValueError("give a checkpoint to write (--out), --report FASTA, or both")
    oprf = args.features not in (None, "favor+")
    if oprf and args.calibrate is None and args.transfer is None:
        raise ValueError(f"--features {args.features} needs --calibrate FASTA: A and Ψ are statistics of the model's "
                         "queries and keys on sequences like those it will see")
    if args.calibrate is not None and not oprf:
        raise ValueError("--calibrate FASTA goes with --features oprf, oprf-rescaled or oprf-dense")
    if oprf and args.attention != "favor":
        raise ValueError(f"--features {args.features} are FAVOR+ features; use --attention favor")
    if args.window and args.attention != "favor":
        raise ValueError(f"--window {args.window} is a FAVOR setting; use --attention favor or leave out --window")
    if args.window is not None and args.window < 0:
        raise ValueError(f"--window must be 0 (off) or a number of keys >= 1, got {args.window}")
    if args.window and args.report is not None:
        raise ValueError("--report measures plain FAVOR without a window; leave out --window (score the written "
                         "checkpoint with pp-evaluate or pp-score instead)")
    from proteinperformer.checkpoints import load_model, save_checkpoint
    from proteinperformer.evaluation.conversion import calibrate_on_fasta, report
    from proteinperformer.model import convert_attention
    from proteinperformer.model.precision import inference_autocast

    device = checked_device(args)  # the report's forward passes; the conversion itself copies weights on the CPU
    if args.transfer is not None:
        transfer(args)
    elif args.out is not None:
        model = load_model(args.source, attention=args.attention, num_features=args.num_features, kernel=args.kernel)
        if not model.layers:
            raise ValueError(f"{args.source}: the model has no attention layers to convert")
        if args.attention == "favor":  # a reproducible draw, whatever load_model drew
            try:
                model = convert_attention(model, "favor", args.num_features, args.kernel, seed=args.seed,
                                          features=args.features, window=args.window or 0)
            except ValueError as err:  # features the kernel cannot use
                raise ValueError(f"{args.source}: {err}") from None
        calibrated = ""
        if oprf:
            n = calibrate_on_fasta(model, args.calibrate, args.max_sequences, device)
            model.cpu()
            a = [f"{float(b.attn.feature_a.mean()):.3f}" for b in model.layers]
            calibrated = (f", {args.features} features calibrated on {n} sequences of {args.calibrate} (mean A per "
                          f"layer {' '.join(a)})")
        save_checkpoint(model, args.out, args.source)
        cfg = model.config
        print(f"wrote {args.out}: {cfg.depth} layers, width {cfg.dim}, {cfg.attention} attention, "
              f"{cfg.kernel} kernel ({model.num_parameters():,} parameters){calibrated}")
    if args.report is not None:
        with inference_autocast(args.precision, device):
            r = report(args.source, args.report, args.num_features, args.kernel, args.draws, args.max_sequences,
                       device=device, features=args.features, calibrate=args.calibrate)
        r["precision"] = args.precision
        print_report(r)
        if args.report_json is not None:
            write_json_atomic(args.report_json, r)


def transfer(args: argparse.Namespace) -> None:
    """``--transfer``: the source converted to FAVOR with trained features, written to ``--out``."""
    from proteinperformer.checkpoints import load_model, save_checkpoint
    from proteinperformer.data.fasta import load_fasta
    from proteinperformer.inference.embed import residue_limit
    from proteinperformer.model import convert_attention
    from proteinperformer.model.transfer import (
        DEFAULT_AUGMENT,
        DEFAULT_FEATURES,
        DEFAULT_KERNEL,
        DEFAULT_WINDOW,
        TransferError,
        calibration_batches,
        default_steps,
        distill_features,
        mutated_copies,
        transfer_attention,
        transfer_model,
    )
    from proteinperformer.progress import track

    if args.out is None or args.attention != "favor":
        raise ValueError("--transfer writes a FAVOR checkpoint: give --out and leave --attention at favor")
    if args.transfer_steps is not None and args.transfer_steps < 1:
        raise ValueError(f"--transfer-steps must be at least 1, got {args.transfer_steps}")
    if args.distill_steps is not None and args.distill_steps < 0:
        raise ValueError(f"--distill-steps must be 0 (no distillation) or more, got {args.distill_steps}")
    if args.calibrate is not None:
        raise ValueError("--transfer calibrates FAVOR++ features on its own sequences: leave out --calibrate")
    augment = DEFAULT_AUGMENT if args.transfer_augment is None else args.transfer_augment
    if augment < 0:
        raise ValueError(f"--transfer-augment must be 0 (no mutated copies) or more, got {augment}")
    kernel = args.kernel or DEFAULT_KERNEL
    source = load_model(args.source)
    if source.config.transferred:
        raise ValueError(f"{args.source}: already transferred (its config says transferred=true); give the "
                         "original model as SOURCE, or use this checkpoint as it is")
    exact = source if source.config.attention == "exact" else convert_attention(source, "exact")
    window = args.window
    if window is None:  # the measured default: the window keeps the sharp local attention FAVOR blurs
        window = DEFAULT_WINDOW if exact.config.causal and kernel == "softmax" else 0
    try:
        model = transfer_model(exact, args.num_features, kernel, args.seed,
                               args.features or (DEFAULT_FEATURES if kernel == "softmax" else "favor+"),
                               window=window)
    except (TransferError, ValueError) as err:
        raise ValueError(f"{args.source}: {err}") from None
    records = [(r.id, r.sequence) for r in load_fasta(args.transfer, exact.alphabet)][: args.max_sequences]
    limit = residue_limit(exact.config)
    batches = calibration_batches(exact.alphabet, mutated_copies(records, augment, seed=args.seed), cls=not args.no_cls,
                                  max_len=None if limit is None else limit + 2)
    cfg = model.config
    steps = args.transfer_steps or default_steps(cfg.depth, cfg.dim, cfg.num_features)
    distill = args.distill_steps or 0
    resume = args.out.with_name(f".{args.out.name}.transfer")
    print(f"transfer on {len(records)} sequences of {args.transfer}: {len(model.layers)} layers, "
          f"{steps} steps each{f', then {distill} steps on all layers' if distill else ''} (finished layers kept in "
          f"{resume})", flush=True)
    t0 = time.process_time()
    results = transfer_attention(exact, model, batches, steps, resume_dir=resume, progress=track)
    kl = distill_features(exact, model, batches, distill, progress=track) if distill else None
    seconds = time.process_time() - t0
    info = {"fasta": str(args.transfer), "sequences": len(records), "augment": augment, "steps": steps,
            "distill_steps": distill,
            "cpu_seconds": seconds, "layers": [asdict(r) for r in results]}
    if kl is not None:
        info.update(distill_kl_before=kl[0], distill_kl_after=kl[1])
    save_checkpoint(model, args.out, args.source, extra={"transfer": info})
    shutil.rmtree(resume, ignore_errors=True)
    window = f", window {cfg.attention_window}" if cfg.attention_window else ""
    print(f"wrote {args.out}: {cfg.depth} layers, width {cfg.dim}, favor attention, {cfg.kernel} kernel "
          f"({cfg.features}), {cfg.num_features} features{window}, transferred in {seconds:.1f} CPU-s; "
          f"attention-output relative error per layer "
          f"{' '.join(f'{r.error_before:.3f}->{r.error_after:.3f}' for r in results)}")


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point ``pp-convert``."""
    run_command(run, create_parser(), argv)


if __name__ == "__main__":
    main()
