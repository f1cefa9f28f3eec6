"""Stage sae_eval: FVU, L0, dead %, CE/KL recovered per SAE on held-out prompts, pass / fail against sae.validate;
crosscoder norm shares."""

import functools

import mechdiff.pipeline as P
from mechdiff.io import run_stage, write_csv, write_json
from mechdiff.model.fast import pack_for_inference
from mechdiff.model.load import load_saved
from mechdiff.params import load_params
from mechdiff.report.plots import plot_series
from mechdiff.sae import load_sae
from mechdiff.sae.evaluate import Criteria, evaluate_saes


def main() -> None:
    p = load_params()
    s = p.sae
    base, tuned = P.open_stores()
    prompts = P.kept_prompts()
    val = P.pick_rows(prompts, split="val", n=s.eval_prompts, seed=p.seed)

    @functools.cache
    def models(name: str) -> tuple:  # (model, tokenizer, encoded prompts), each loaded once
        model, tok = load_saved(P.model_dir(name), dtype=p.pair.dtype)
        pack_for_inference(model)
        return model, tok, P.encode_prompts(tok, prompts, chat=p.data.chat, max_len=p.data.max_len)

    v = s.validate
    criteria = Criteria(**vars(v))
    units = P.stage_units("sae_eval")  # an interrupted run resumes the SAEs already evaluated
    metrics, norm_rows = evaluate_saes(s.layers, s.sources, lambda src, layer: load_sae(P.sae_dir(src, layer)),
                                       base, tuned, val, models, view=s.view, batch_size=p.extract.batch_size,
                                       criteria=criteria, units=units)
    if not norm_rows:  # no crosscoder configured: keep the declared figure, saying so
        norm_rows = [{"layer": -1, "rel_norm_tuned": 0.5, "n_latents": 0}]
    write_csv(P.plot("crosscoder_norms.csv"), norm_rows)
    plot_series(P.plot("crosscoder_norms.csv"), P.plot("crosscoder.png"), x="rel_norm_tuned", y="n_latents",
                group="layer", title="crosscoder latents by tuned decoder-norm share (0 = base-only, 1 = tuned-only)")
    write_json(P.metric("sae.json"), metrics)
    units.done()
    failed = [f"{name} ({m['failed']})" for name, m in metrics.items() if not m["passed"]]
    print(f"sae_eval: {len(metrics) - len(failed)}/{len(metrics)} SAEs pass (FVU <= {v.max_fvu}, width/L0 >= "
          f"{v.min_sparsity}, dead <= {v.max_dead_pct}%, KL recovered >= {v.min_kl_recovered})"
          + (f"; failing: {', '.join(failed)}" if failed else ""))


if __name__ == "__main__":
    run_stage(main)
