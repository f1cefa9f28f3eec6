"""Stage behaviour: base vs tuned on the behaviour metrics (marker and refusal rates of greedy continuations,
answer accuracy where the prompts carry reference answers, multiple-choice accuracy, reference-answer
log-probability, new-token mass), tuned - base with bootstrap CIs."""

import time

import mechdiff.pipeline as P
from mechdiff.analysis.behaviour import behaviour_table, score_model
from mechdiff.data.corpus import has_reference, load_prompts
from mechdiff.errors import MechdiffError
from mechdiff.io import run_stage, write_csv, write_json
from mechdiff.model.fast import pack_for_inference
from mechdiff.model.load import load_saved
from mechdiff.params import load_params
from mechdiff.pipeline import allowed_ids, encode_prompts, eval_sets, kept_prompts, pick_rows


def main() -> None:
    p = load_params()
    b = p.behaviour
    t0 = time.time()
    prompts = kept_prompts()
    present = {q.dataset for q in prompts}
    unknown = sorted(set(b.datasets) - present)
    if unknown:
        raise MechdiffError(f"behaviour.datasets names {unknown}, not datasets of the corpus "
                            f"({', '.join(sorted(present))}): fix params.yaml")
    gen_rows = {ds: pick_rows(prompts, split=b.split, datasets=(ds,), n=b.max_prompts, seed=p.seed)
                for ds in b.datasets}
    # generated datasets whose prompts all carry a reference answer (math): accuracy of the greedy answers too
    answers = {ds: [prompts[i].reference for i in rows] for ds, rows in gen_rows.items()
               if all(has_reference(prompts[i]) for i in rows)}
    mc, refs = eval_sets(load_prompts(P.EVAL_PROMPTS), split=b.split, n=b.max_prompts, seed=p.seed)
    patterns = {**{name: [rx] for name, rx in b.markers.items()}, "refusal": list(b.refusal_patterns)}
    allowed = dict(zip(("base", "tuned"), allowed_ids()))
    units = P.stage_units("behaviour")  # an interrupted run resumes each model's finished datasets
    scores = {}
    for which in ("base", "tuned"):
        model, tok = load_saved(P.model_dir(which), dtype=p.pair.dtype)
        pack_for_inference(model)
        enc = encode_prompts(tok, prompts, chat=p.data.chat, max_len=p.data.max_len)
        scores[which] = score_model(
            model, tok, enc, gen_rows, patterns, mc=mc, refs=refs, answers=answers,
            allowed=allowed["tuned"] if which == "tuned" else None, chat=p.data.chat, max_len=p.data.max_len + 64,
            max_new_tokens=b.max_new_tokens, batch_size=b.batch_size, progress=True, mc_score=b.mc_score,
            units=units.scoped(f"{which}/"))
        del model
    rows, metrics = behaviour_table(scores["base"], scores["tuned"], n_boot=b.n_boot, seed=p.seed)
    write_csv(P.plot("behaviour.csv"), rows)
    write_json(P.metric("behaviour.json"), {**metrics, "seconds": time.time() - t0})
    units.done()
    for r in rows:
        print(f"behaviour: {r['label']:<40} base {r['base'] if r['base'] is None else round(r['base'], 3)} "
              f"tuned {r['tuned'] if r['tuned'] is None else round(r['tuned'], 3)}")


if __name__ == "__main__":
    run_stage(main)
