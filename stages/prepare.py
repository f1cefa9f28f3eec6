"""Stage prepare: load the corpora and the scored sets, split them (grouped, seeded) and write
artifacts/prompts/prompts.jsonl (the extraction corpus) and artifacts/prompts/eval.jsonl (the scored sets)."""

from collections import Counter

import mechdiff.pipeline as P
from mechdiff.data.corpus import (
    MC_SOURCES,
    check_scored,
    load_corpus,
    prepared_prompts,
    save_prompts,
    split_prompts,
)
from mechdiff.io import run_stage, write_json
from mechdiff.params import load_params


def main() -> None:
    p = load_params()
    prompts = prepared_prompts(p.data.dir, p.data.sources, max_per_dataset=p.data.max_per_dataset,
                               splits=p.data.splits, seed=p.seed)
    save_prompts(P.PROMPTS, prompts)
    # scored sets (multiple choice, reference answers): split the same way, never extracted
    evals = load_corpus(p.data.dir, p.data.eval_sources or MC_SOURCES, max_per_dataset=p.data.max_per_dataset,
                        seed=p.seed)
    check_scored(evals)
    evals = split_prompts(evals, tuple(p.data.splits), seed=p.seed)
    save_prompts(P.EVAL_PROMPTS, evals)
    counts = Counter((q.dataset, q.split) for q in [*prompts, *evals])
    write_json(P.metric("prepare.json"), {
        "n_prompts": len(prompts),
        "n_eval": len(evals),
        **{f"n_{d}_{s}": n for (d, s), n in sorted(counts.items())},
    })
    print(f"prepare: {len(prompts)} prompts -> {P.PROMPTS}")


if __name__ == "__main__":
    run_stage(main)
