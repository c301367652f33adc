"""``pp-convert``: turn a Transformer (an ESM-2 file, a Hugging Face ESM directory or an exact-attention project
checkpoint) into a Performer checkpoint, and measure what the swap costs on your own sequences.

    pp-convert esm2_t6_8M_UR50D.pt esm2_8M_favor.ckpt --attention favor        # write a project checkpoint
    pp-convert esm2_t6_8M_UR50D.pt --report my_proteins.fasta                  # what FAVOR+ changes, per layer
    pp-train init_from=esm2_8M_favor.ckpt data.fasta_path=my.fasta            # fine-tune it (MLM)

The checkpoint holds the weights, ``hyper_parameters.config`` and the alphabet (``embed.load_model``,
``pp-embed``, ``pp-probe``, ``pp-contacts``, ``pp-attention-blosum`` and ``train.py init_from=`` read it).

``--report FASTA`` runs the exact model and its FAVOR+ conversion on the sequences and prints, per layer, the
relative error ‖y_favor − y_exact‖ / ‖y_exact‖ of the attention output (both given the exact model's input to
that layer, residue and special tokens of every sequence), and the masked-residue accuracy / perplexity of
both models (15% of residues replaced by ``<mask>``, fixed seed), over ``--draws`` projection draws.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

import torch

from proteinperformer.model import PerformerLM, convert_attention

DEFAULT_NUM_FEATURES = 256  # see README "ESM-2 as a Performer": the error falls as m^-1/2; 256 is ~2x of 64's


def save_checkpoint(model: PerformerLM, path: str | Path, source: str | Path) -> Path:
    """Write ``model`` as a project checkpoint (temp file + rename) that ``load_model`` and ``init_from`` read."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt = {
        "state_dict": {f"model.{k}": v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "hyper_parameters": {"config": model.config.to_dict(), "task": "clm" if model.config.causal else "mlm"},
        "alphabet": list(model.alphabet.all_toks),
        "converted_from": str(source),
    }
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)
    return path


@torch.no_grad()
def attention_errors(exact: PerformerLM, favor: PerformerLM, tokens: torch.Tensor) -> list[float]:
    """Per layer: squared error and squared norm sums of FAVOR+ vs exact attention output on exact's inputs."""
    inputs: list[torch.Tensor] = []
    hooks = [b.attn.register_forward_hook(lambda _m, args, _o: inputs.append(args[0])) for b in exact.layers]
    try:
        exact(tokens)
    finally:
        for h in hooks:
            h.remove()
    out = []
    for x, e_block, f_block in zip(inputs, exact.layers, favor.layers, strict=True):
        ye, yf = e_block.attn(x).double(), f_block.attn(x).double()
        out.append((float((yf - ye).pow(2).sum()), float(ye.pow(2).sum())))
    return out


@torch.no_grad()
def masked_scores(model: PerformerLM, tokens: torch.Tensor, masked: torch.Tensor) -> tuple[int, float]:
    """(correct predictions, summed NLL) at the ``masked`` positions of ``tokens`` (which hold <mask> there)."""
    logits = model(tokens)["logits"].float()
    target = masked["target"]
    logp = torch.log_softmax(logits[masked["where"]], -1)
    nll = -logp.gather(1, target[:, None]).sum().item()
    return int((logp.argmax(-1) == target).sum()), nll


def mask_residues(tokens: torch.Tensor, alphabet, rate: float = 0.15, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """Replace ``rate`` of the residues (at least one) by <mask>: (masked tokens, {"where", "target"})."""
    g = torch.Generator().manual_seed(seed)
    residue = alphabet.is_residue(tokens)
    pick = residue & (torch.rand(tokens.shape, generator=g) < rate)
    if not pick.any():
        pick[0, 1] = True
    masked = tokens.masked_fill(pick, alphabet.mask_idx)
    return masked, {"where": pick, "target": tokens[pick]}


def report(source: str | Path, fasta: str | Path, num_features: int = DEFAULT_NUM_FEATURES, kernel: str = "softmax",
           draws: int = 3, max_sequences: int = 200, max_residues: int = 1022) -> dict:
    """What FAVOR+ changes on the sequences of ``fasta``: per-layer attention error and exact vs FAVOR+ MLM.

    Sequences are cropped to ``max_residues`` or the exact model's limit. Returns a dict (see ``pp-convert``).
    """
    from proteinperformer.embed import as_records, load_model, residue_limit

    exact = load_model(source, attention="exact")
    max_residues = min(max_residues, residue_limit(exact.config) or max_residues)
    records = [(label, seq[:max_residues]) for label, seq in as_records(fasta)[:max_sequences]]
    converter = exact.alphabet.get_batch_converter()
    batches = [converter([r])[2] for r in records]  # one sequence per pass: no padding in the comparison
    masks = [mask_residues(t, exact.alphabet, seed=i) for i, t in enumerate(batches)]
    depth = exact.config.depth
    err = torch.zeros(draws, depth, 2, dtype=torch.float64)
    scores = {"exact": [0, 0.0], "favor": [0, 0.0]}
    n_masked = sum(int(m["where"].sum()) for _, m in masks)
    for masked, where in masks:
        c, nll = masked_scores(exact, masked, where)
        scores["exact"][0] += c
        scores["exact"][1] += nll
    favor_scores = []
    for d in range(draws):
        favor = convert_attention(exact, "favor", num_features, kernel, seed=d).eval()
        correct, nll = 0, 0.0
        for tokens, (masked, where) in zip(batches, masks, strict=True):
            err[d] += torch.tensor(attention_errors(exact, favor, tokens), dtype=torch.float64)
            c, n = masked_scores(favor, masked, where)
            correct, nll = correct + c, nll + n
        favor_scores.append((correct / n_masked, math.exp(nll / n_masked)))
    rel = (err[..., 0] / err[..., 1]).sqrt()  # [draws, depth]
    return {
        "source": str(source), "fasta": str(fasta), "sequences": len(records), "masked_residues": n_masked,
        "num_features": num_features, "kernel": kernel, "draws": draws,
        "layer_rel_error_mean": rel.mean(0).tolist(), "layer_rel_error_std": rel.std(0).tolist() if draws > 1
        else [0.0] * depth,
        "exact_acc": scores["exact"][0] / n_masked, "exact_ppl": math.exp(scores["exact"][1] / n_masked),
        "favor_acc": sum(a for a, _ in favor_scores) / draws, "favor_ppl": sum(p for _, p in favor_scores) / draws,
        "favor_acc_per_draw": [a for a, _ in favor_scores], "favor_ppl_per_draw": [p for _, p in favor_scores],
    }


def print_report(r: dict) -> None:
    print(f"{r['source']}: FAVOR+ ({r['kernel']} kernel, {r['num_features']} features, {r['draws']} draws) vs "
          f"exact attention on {r['sequences']} sequences of {r['fasta']}")
    print("layer  relative error of the attention output (mean ± std over draws)")
    for i, (m, s) in enumerate(zip(r["layer_rel_error_mean"], r["layer_rel_error_std"], strict=True), start=1):
        print(f"{i:>5}  {m:.4f} ± {s:.4f}")
    print(f"masked-residue accuracy  exact {100 * r['exact_acc']:.2f}%   FAVOR+ {100 * r['favor_acc']:.2f}%")
    print(f"perplexity               exact {r['exact_ppl']:.3f}   FAVOR+ {r['favor_ppl']:.3f}   "
          f"({r['masked_residues']} masked residues)")


def create_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pp-convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="ESM-2 .pt file, Hugging Face ESM directory or project .ckpt")
    parser.add_argument("output", type=Path, nargs="?", help="project checkpoint to write (.ckpt)")
    parser.add_argument("--attention", choices=("favor", "exact"), default="favor")
    parser.add_argument("--num-features", type=int, default=DEFAULT_NUM_FEATURES, help="random features per head")
    parser.add_argument("--kernel", choices=("softmax", "relu"), default="softmax",
                        help="FAVOR+ kernel (softmax estimates the trained softmax attention)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the FAVOR+ projection draw")
    parser.add_argument("--report", type=Path, metavar="FASTA", help="measure FAVOR+ vs exact on these sequences")
    parser.add_argument("--report-json", type=Path, help="also write the report as JSON here")
    parser.add_argument("--draws", type=int, default=3, help="projection draws the report averages over")
    parser.add_argument("--max-sequences", type=int, default=200, help="report: first N sequences of FASTA")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    from proteinperformer.embed import CheckpointError, load_model
    from proteinperformer.tokenizer import TokenizationError

    args = create_parser().parse_args(argv)
    if args.output is None and args.report is None:
        raise SystemExit("error: give an OUTPUT checkpoint to write, --report FASTA, or both")
    try:
        if args.output is not None:
            model = load_model(args.source, attention=args.attention, num_features=args.num_features,
                               kernel=args.kernel)
            if args.attention == "favor":  # a reproducible draw, whatever load_model drew
                model = convert_attention(model, "favor", args.num_features, args.kernel, seed=args.seed)
            save_checkpoint(model, args.output, args.source)
            print(f"wrote {args.output}: {model.config.depth} layers, width {model.config.dim}, "
                  f"{model.config.attention} attention ({model.num_parameters():,} parameters)")
        if args.report is not None:
            r = report(args.source, args.report, args.num_features, args.kernel, args.draws, args.max_sequences)
            print_report(r)
            if args.report_json is not None:
                tmp = args.report_json.with_name(f".{args.report_json.name}.tmp")
                tmp.write_text(json.dumps(r, indent=2) + "\n")
                os.replace(tmp, args.report_json)
    except (CheckpointError, TokenizationError, FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
