"""Stage heads: per-head attribution of the tuned behaviour in base and tuned, churn and top-k overlap, single-head
patching and zero ablation beside the attribution, and the cumulative patching curve."""

import time

import numpy as np

import mechdiff.pipeline as P
from mechdiff.analysis.behaviour import greedy_continuations, scored_sequences
from mechdiff.analysis.heads import diff_heads, head_rows, make_batches
from mechdiff.errors import MechdiffError
from mechdiff.io import run_stage, write_csv, write_json, write_skipped
from mechdiff.model.fast import pack_for_inference
from mechdiff.model.load import load_saved
from mechdiff.model.tokens import pad_id
from mechdiff.params import load_params
from mechdiff.pipeline import encode_prompts, kept_prompts, pick_rows


def continuations(target: str, tuned, tok, prompts: list, *, signature: str, chat: bool, max_len: int,
                  max_new_tokens: int, batch_size: int) -> list[str]:
    """The continuation whose log-prob is the head target, per prompt ("" where there is none)."""
    if target == "signature":
        return [signature] * len(prompts)
    if target == "reference":
        missing = [q.pid for q in prompts if not q.reference]
        if missing:
            raise MechdiffError(f"heads.target reference: {len(missing)} prompts of heads.dataset have no reference "
                                "answer: use heads.target tuned or a dataset with references")
        return [q.reference for q in prompts]
    enc = encode_prompts(tok, prompts, chat=chat, max_len=max_len)
    return greedy_continuations(tuned, tok, enc, np.arange(len(prompts)), max_new_tokens=max_new_tokens,
                                batch_size=batch_size, progress=True)


# the plot files' columns (header-only files when the stage does not apply to the pair)
SKIPPED_COLUMNS = {
    "heads_attribution.csv": ("layer", "head", "label", "base", "tuned", "delta", "z_base", "z_tuned", "dz", "pred",
                              "direct"),
    "heads_dz.csv": ("layer", "head", "dz"), "heads_base.csv": ("layer", "head", "z_base"),
    "heads_tuned.csv": ("layer", "head", "z_tuned"),
    "heads_patch.csv": ("layer", "head", "group", "rank", "delta_attr", "pred", "direct", "attr_tuned", "patch_effect",
                        "patch_share", "patch_kl", "patch_kl_share", "zero_effect", "zero_share"),
    "heads_curve.csv": ("n_heads", "share", "kl_share", "effect"),
}


def main() -> None:
    p = load_params()
    h = p.heads
    t0 = time.time()
    if not P.tokenizers_identical():  # every other stage still runs: this one writes why it did not
        write_skipped("heads", "this pair's tokenizers differ, and head attribution and patching run both models on "
                      "the same tokens", P.metric("heads.json"), {P.plot(name): cols for name, cols in SKIPPED_COLUMNS.items()})
        return
    prompts = kept_prompts()
    present = {q.dataset for q in prompts}
    if h.dataset not in present:
        raise MechdiffError(f"heads.dataset {h.dataset!r} is not a dataset of the corpus ({', '.join(sorted(present))})")
    rows = pick_rows(prompts, split=h.split, datasets=(h.dataset,), n=h.max_prompts, seed=p.seed)
    chosen = [prompts[r] for r in rows]
    base, tok = load_saved(P.model_dir("base"), device=p.heads.device, dtype=p.pair.dtype)
    tuned, _ = load_saved(P.model_dir("tuned"), device=p.heads.device, dtype=p.pair.dtype)
    for m in (base, tuned):  # no-grad forwards on packed weights; attribution with gradients takes kernels.linear
        pack_for_inference(m)
    conts = continuations(h.target, tuned, tok, chosen, signature=p.pair.finetune.signature, chat=p.data.chat,
                          max_len=p.data.max_len, max_new_tokens=h.max_new_tokens, batch_size=h.batch_size)
    keep = [i for i, c in enumerate(conts) if c.strip()]
    if not keep:
        raise MechdiffError("the tuned model ends every target prompt at once (empty continuations): use "
                            "heads.target signature or reference")
    seqs, n_prompt, _, n_cont = scored_sequences(tok, [chosen[i].text for i in keep], [conts[i] for i in keep],
                                                 chat=p.data.chat, max_len=p.data.max_len + 64)
    batches = make_batches(seqs, n_prompt, n_cont, pad=pad_id(tok), batch_size=h.batch_size, device=h.device)
    units = P.stage_units("heads")  # an interrupted run resumes the finished head patches
    res = diff_heads(base, tuned, batches, z_threshold=h.z_threshold, abs_threshold=h.abs_threshold, top_k=h.top_k,
                     n_patch=h.n_patch, n_random=h.n_random, target_effect=h.target_effect, ig_steps=h.ig_steps, rank_by=h.rank_by,
                     seed=p.seed, progress=True, units=units)
    rows_all = head_rows(res)
    write_csv(P.plot("heads_attribution.csv"), rows_all)
    for name, col in (("heads_dz.csv", "dz"), ("heads_base.csv", "z_base"), ("heads_tuned.csv", "z_tuned")):
        write_csv(P.plot(name), [{"layer": r["layer"], "head": r["head"], col: r[col]} for r in rows_all])
    write_csv(P.plot("heads_patch.csv"), res["patched"])
    write_csv(P.plot("heads_curve.csv"), res["curve"])
    m = res["metrics"]
    examples = sorted({conts[i] for i in keep}, key=lambda c: (-sum(x == c for x in conts), c))[:3]  # ties: by text
    write_json(P.metric("heads.json"), {**m, "dataset": h.dataset, "target": h.target, "continuations": examples,
                                        "seconds": time.time() - t0})
    units.done()
    print(f"heads: churn {m['churn']:.3f} (|dz| > {h.z_threshold}), top-{h.top_k} Jaccard {m['jaccard_top_k']:.2f}, "
          f"{m['heads_for_target']} heads close {h.target_effect:.0%} of the gap ({m['gap']:.3f} nats), "
          f"Spearman patch {m['spearman_patch'] and round(m['spearman_patch'], 3)}, in {time.time() - t0:.0f}s")
    if not m["gap_significant"]:
        print(f"heads: warning: the base -> tuned gap {m['gap']:.3g} nats has a 95% CI [{m['gap_lo']:.3g}, "
              f"{m['gap_hi']:.3g}] that reaches 0: every share of it (patch_share, zero_share, the curve, "
              "heads_for_target) is a ratio of noise; pick heads.dataset / heads.target where the models differ")
    direct, pred = (", ".join(f"L{a}H{b}" for a, b in m[key]) or "none" for key in ("top_direct", "top_pred"))
    print(f"heads: changed by the tuning (top_direct) {direct}; carrying the change (top_pred) {pred}")


if __name__ == "__main__":
    run_stage(main)
