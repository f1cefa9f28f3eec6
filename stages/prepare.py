"""Stage prepare: load the corpora and the scored sets, split them (grouped, seeded) and write
artifacts/prompts/prompts.jsonl (the extraction corpus) and artifacts/prompts/eval.jsonl (the scored sets)."""

from collections import Counter

import mechdiff.pipeline as P
from mechdiff.data.corpus import MC_SOURCES, check_splits, load_corpus, save_prompts, split_prompts
from mechdiff.io import run_stage, write_json
from mechdiff.params import load_params


def main() -> None:
    p = load_params()
    prompts = load_corpus(p.data.dir, p.data.sources, max_per_dataset=p.data.max_per_dataset, seed=p.seed)
    prompts = split_prompts(prompts, tuple(p.data.splits), seed=p.seed)
    check_splits(prompts, p.data.splits, key="data.sources" if p.data.sources is not None else "data.dir")
    save_prompts(P.PROMPTS, prompts)
    # scored sets (multiple choice, reference answers): split the same way, never extracted
    evals = load_corpus(p.data.dir, p.data.eval_sources or MC_SOURCES, max_per_dataset=p.data.max_per_dataset,
                        seed=p.seed)
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
