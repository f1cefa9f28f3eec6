"""Stage gates: identifiability gates over the base / tuned / delta SAEs (variance, sparsity, region coverage, causal
sufficiency, corruption consistency, side effects), the funnel and the CCIS count."""

import time

import numpy as np

import mechdiff.pipeline as P
from mechdiff.analysis.gates import GateInputs, run_gates
from mechdiff.data.corpus import corruptible, corruptions, cultural_entities, load_prompts
from mechdiff.errors import MechdiffError
from mechdiff.io import run_stage, write_csv, write_json, write_skipped
from mechdiff.model.fast import pack_for_inference
from mechdiff.model.load import load_saved
from mechdiff.model.sites import Site
from mechdiff.params import load_params
from mechdiff.pipeline import encode_prompts, eval_sets, kept_prompts, pick_rows
from mechdiff.sae import load_sae
from mechdiff.sae.sources import tokens_paired


def main() -> None:
    p = load_params()
    g = p.gates
    t0 = time.time()
    base, tuned = P.open_stores()

    def skip(why: str) -> None:  # every other stage still runs: this one writes why it did not
        write_skipped("gates", f"{why}, and the gates splice delta features with base and tuned activations of the "
                      "same tokens", P.metric("gates.json"),
                      {P.plot("gates_funnel.csv"): ("gate", "n", "base", "tuned", "delta"),
                       P.plot("gates_features.csv"): (), P.plot("gates_corruptions.csv"): ()})

    # tokenizers that differ only where the prompts do not reach (e.g. a renamed unused special token) still give
    # both models the same token ids
    if not P.tokenizers_identical() and not tokens_paired(base, tuned):
        return skip("the two models' prompts do not hold the same token ids (their tokenizers differ)")
    prompts = kept_prompts()
    table = cultural_entities()
    # the region of each prompt: its own field, else its entity's (prompts prepared before regions existed)
    regions = np.array([q.region or table.get(q.group, {}).get("region", "") if q.dataset == "cultural" else ""
                        for q in prompts], dtype=object)
    for src in ("base", "tuned", "delta"):
        if not P.sae_dir(src, g.layer).is_dir():
            raise MechdiffError(f"gates.layer {g.layer}: there is no {src} SAE at L{g.layer} ({P.sae_dir(src, g.layer)}):"
                                " set gates.layer to one of sae.layers, with base, tuned and delta in sae.sources")
    saes = {src: load_sae(P.sae_dir(src, g.layer)) for src in ("base", "tuned", "delta")}
    models, tok = {}, None
    for which in ("base", "tuned"):
        models[which], t = load_saved(P.model_dir(which), dtype=p.pair.dtype)
        pack_for_inference(models[which])
        tok = t if which == "tuned" else tok
    if len(models["base"].get_input_embeddings().weight) != len(models["tuned"].get_input_embeddings().weight):
        return skip("the two models' vocabularies differ in size (the corruptions, signature and questions would "
                    "reach tokens one of them lacks)")
    enc = encode_prompts(tok, prompts, chat=p.data.chat, max_len=p.data.max_len)
    held = pick_rows(prompts, split="val", datasets=("cultural",))
    held = np.union1d(held, pick_rows(prompts, split="test", datasets=("cultural",)))
    # the causal pool's cultural prompts name their entity (the corruptions replace it)
    target = np.array([r for r in pick_rows(prompts, split="test", datasets=("cultural",))
                       if corruptible(prompts[r].text, prompts[r].group)], dtype=np.int64)
    if g.max_prompts < len(target):
        target = np.sort(np.random.default_rng(p.seed).choice(target, size=g.max_prompts, replace=False))
    control = pick_rows(prompts, split="test", datasets=("control",), n=g.max_prompts, seed=p.seed)
    corrupted = {}
    for r in target:
        for meth, text in corruptions(prompts[r].text, prompts[r].group, seed=p.seed).items():
            corrupted.setdefault(meth, []).append(text)
    mc, _ = eval_sets(load_prompts(P.EVAL_PROMPTS), split="test", n=g.mc_questions, seed=p.seed)
    if "mc_neutral" not in mc:
        raise MechdiffError("the gates' side effects need the mc_neutral scored set (data.eval_sources)")
    sig = tok(p.pair.finetune.signature, add_special_tokens=False)["input_ids"]
    inp = GateInputs(
        saes=saes, base=base, tuned=tuned, site=Site.parse(f"L{g.layer}.resid_post"), view=p.sae.view,
        regions=regions, train_rows=pick_rows(prompts, split="train", datasets=("cultural",)), heldout_rows=held,
        models=models, enc=enc, tokenizer=tok, signature_id=int(sig[0]), target_rows=target, control_rows=control,
        corrupted=corrupted, neutral_rows=pick_rows(prompts, split="test", datasets=("neutral",),
                                                    n=g.neutral_prompts, seed=p.seed),
        mc=mc["mc_neutral"], chat=p.data.chat, max_len=p.data.max_len)
    st = g.settings(seed=p.seed)
    units = P.stage_units("gates")  # an interrupted run resumes each measured feature
    res = run_gates(inp, st, progress=lambda m: print(f"gates: {m}", flush=True), units=units)
    res.seconds["stage"] = time.time() - t0
    write_csv(P.plot("gates_funnel.csv"), res.funnel_rows())
    write_csv(P.plot("gates_features.csv"), [{"source": r["source"], "layer": g.layer, **r} for r in res.features])
    write_csv(P.plot("gates_corruptions.csv"), res.corruption_rows)
    write_json(P.metric("gates.json"), res.metrics_json())
    units.done()
    print(f"gates: funnel {res.funnel}; {res.n_ccis} features with CCIS > {g.ccis_min} at p < {g.alpha} "
          f"({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    run_stage(main)
