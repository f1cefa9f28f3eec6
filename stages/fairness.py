"""Stage fairness: shared vocabulary of the two tokenizers, prompt filter and logit masks."""

import numpy as np

import mechdiff.pipeline as P
from mechdiff.data.corpus import load_prompts
from mechdiff.data.fairness import filter_prompts, no_prompts_kept, shared_vocab
from mechdiff.errors import MechdiffError
from mechdiff.io import run_stage, write_json
from mechdiff.model.load import load_tokenizer
from mechdiff.params import load_params


def main() -> None:
    p = load_params()
    prompts = load_prompts(P.PROMPTS)
    tb, tt = load_tokenizer(P.model_dir("base")), load_tokenizer(P.model_dir("tuned"))
    sv = shared_vocab(tb, tt)
    f = p.pair.fairness
    if sv.identical or not f.enabled:
        keep = np.arange(len(prompts))
    else:
        keep = np.asarray(filter_prompts([q.text for q in prompts], tb, tt, sv, mode=f.mode,
                                         min_ratio=f.min_shared_ratio, chat=p.data.chat), dtype=np.int64)
    kept_pids = np.array([prompts[i].pid for i in keep], dtype=np.int64)
    if not len(kept_pids):
        raise MechdiffError(no_prompts_kept(f.mode, f.min_shared_ratio, sv.n_shared))
    np.savez(P.FAIRNESS, identical=sv.identical, kept_pids=kept_pids,
             allowed_base=sv.pair_a, allowed_tuned=sv.pair_b)  # aligned string by string
    write_json(P.metric("fairness.json"), {
        "identical_tokenizers": int(sv.identical), "n_shared_tokens": sv.n_shared,
        "n_prompts": len(prompts), "n_kept": len(kept_pids),
    })
    print(f"fairness: tokenizers {'identical' if sv.identical else 'differ'}; kept {len(kept_pids)}/{len(prompts)} prompts")


if __name__ == "__main__":
    run_stage(main)
