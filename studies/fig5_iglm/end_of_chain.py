"""Where a converted IgLM departs from exact attention along the chain: the generation diagnosis of issue 31.

For the held-out human heavy chains of ``transfer_study.py`` (60 per chain type, the human heavy ones among them),
teacher-forced, in IgLM's framing: p([SEP]) at the true end, the mean per-token KL(exact ‖ model) by fifth of the
chain and over the last 12 targets, and, on the first 8 chains, how much attention each layer's queries put on the
last 3 keys in mid-chain (positions 40–59) and in framework 4 (the last 12), exact against converted, with the
total-variation distance between the two attention distributions (the converted one by its definition,
``attention.reference.favor_weights``, float64)::

    OMP_NUM_THREADS=1 nice -n 10 python studies/fig5_iglm/end_of_chain.py runs/fig5_real IgLM \\
        runs/fig5_real/IgLM_transfer_m256.ckpt

Prints one JSON line per checkpoint.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from transfer_study import load_exact, test_records  # this folder: the script's sys.path[0]

from proteinperformer.attention.reference import favor_weights
from proteinperformer.checkpoints import load_model
from proteinperformer.model.transfer import layer_inputs

LOCAL = 3  # "local" keys: the query's own position and the two before it


def _mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 4)


@torch.no_grad()
def along_the_chain(exact, model, records) -> dict:
    """p([SEP]) at the end, KL by fifth and over the last 12 targets (the first residue's target onwards)."""
    a = exact.alphabet
    sep, fifths, last = [], [[] for _ in range(5)], [[] for _ in range(12)]
    for rid, _, seq in records:
        t = torch.tensor(a.encode(seq, rid).tolist() + [a.eos_idx])[None]
        le = F.log_softmax(exact(t[:, :-1])["logits"].double(), -1)[0, 1:]
        lm = F.log_softmax(model(t[:, :-1])["logits"].double(), -1)[0, 1:]
        sep.append(float(lm[-1, a.eos_idx].exp()))
        kl = (le.exp() * (le - lm)).sum(-1)
        for p in range(len(kl)):
            fifths[min(4, 5 * p // len(kl))].append(float(kl[p]))
        for j in range(12):
            last[j].append(float(kl[len(kl) - 12 + j]))
    return {"p_sep_at_end": _mean(sep), "kl_by_fifth": [_mean(v) for v in fifths],
            "kl_last12": [_mean(v) for v in last]}


@torch.no_grad()
def local_attention(exact, model, records) -> list[dict]:
    """Per layer and region: (exact, converted) attention mass on the last LOCAL keys, total-variation distance."""
    a = exact.alphabet
    out = []
    for layer, (e_block, m_block) in enumerate(zip(exact.layers, model.layers, strict=True)):
        sums = {"mid": [0.0, 0.0, 0.0], "fr4": [0.0, 0.0, 0.0]}
        for rid, _, seq in records:
            t = torch.tensor(a.encode(seq, rid).tolist())[None]
            batch = [(t, torch.zeros_like(t, dtype=torch.bool))]
            x = next(xs for i, xs in enumerate(layer_inputs(exact, batch)) if i == layer)[0]
            q, k, _ = e_block.attn.split_heads(x)
            L = q.shape[2]
            future = torch.full((L, L), float("-inf")).triu(1)
            w_exact = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + future, -1)[0].double()
            if m_block.attn.window:  # the sliding-window hybrid: its weights are its output on one-hot values
                eye = torch.eye(L).expand(1, q.shape[1], L, L)
                w_model = m_block.attn.favor(q, k, eye)[0].double()
            else:
                qq, kk, P = m_block.attn.feature_inputs(q, k)
                w_model = favor_weights(qq.double(), kk.double(), P.double(), kernel=m_block.attn.kernel,
                                        causal=True)[0]
            local = torch.ones(L, L).tril() - torch.ones(L, L).tril(-LOCAL)
            for region, rows in (("mid", list(range(40, 60))), ("fr4", list(range(L - 12, L)))):
                sums[region][0] += float((w_exact[:, rows] * local[rows]).sum(-1).mean())
                sums[region][1] += float((w_model[:, rows] * local[rows]).sum(-1).mean())
                sums[region][2] += float((w_exact[:, rows] - w_model[:, rows]).abs().sum(-1).mean() / 2)
        n = len(records)
        out.append({region: {"exact_local": round(s[0] / n, 3), "model_local": round(s[1] / n, 3),
                             "tv_distance": round(s[2] / n, 3)} for region, s in sums.items()})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("model", choices=("IgLM-S", "IgLM"))
    parser.add_argument("checkpoints", nargs="+", help="converted checkpoints (or the exact model's directory)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    exact = load_exact(args.model)
    records = [r for r in test_records(args.outdir, 60) if r[1] == "heavy" and "[HUMAN]" in r[2]]
    for path in args.checkpoints:
        model = load_model(path).eval()
        row = {"checkpoint": path, "chains": len(records), **along_the_chain(exact, model, records)}
        if model.config.attention == "favor":
            row["local_attention"] = local_attention(exact, model, records[:8])
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
