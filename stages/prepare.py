"""Stage prepare: load the corpora, split them (grouped, seeded) and write artifacts/prompts/prompts.jsonl."""

from collections import Counter

import mechdiff.pipeline as P
from mechdiff.data.corpus import load_corpus, save_prompts, split_prompts
from mechdiff.io import run_stage, write_json
from mechdiff.params import load_params


def main() -> None:
    p = load_params()
    prompts = load_corpus(p.data.dir, p.data.sources, max_per_dataset=p.data.max_per_dataset, seed=p.seed)
    prompts = split_prompts(prompts, tuple(p.data.splits), seed=p.seed)
    save_prompts(P.PROMPTS, prompts)
    counts = Counter((q.dataset, q.split) for q in prompts)
    write_json(P.metric("prepare.json"), {
        "n_prompts": len(prompts),
        **{f"n_{d}_{s}": n for (d, s), n in sorted(counts.items())},
    })
    print(f"prepare: {len(prompts)} prompts -> {P.PROMPTS}")


if __name__ == "__main__":
    run_stage(main)
