"""Stage sae_eval: FVU, L0, dead %, CE/KL recovered per SAE on held-out prompts; crosscoder norm shares."""

import functools

import numpy as np

import mechdiff.pipeline as P
from mechdiff.io import run_stage, write_csv, write_json
from mechdiff.model.load import load_saved
from mechdiff.model.sites import Site
from mechdiff.model.tokens import pad_id
from mechdiff.params import load_params
from mechdiff.pipeline import encode_prompts, kept_prompts, pick_rows
from mechdiff.report.html import plot_series
from mechdiff.sae import eval_sae, load_sae, spliced_metrics
from mechdiff.sae.sources import read_source, source_rows


def main() -> None:
    p = load_params()
    s = p.sae
    base, tuned = P.open_stores()
    prompts = kept_prompts()
    val = pick_rows(prompts, split="val", n=s.eval_prompts, seed=p.seed)
    models: dict = {}  # name -> (model, tokenizer, encoded prompts), each loaded once
    metrics: dict = {}
    norm_rows = []

    def load(name: str) -> tuple:
        if name not in models:
            model, tok = load_saved(P.model_dir(name))
            models[name] = (model, tok, encode_prompts(tok, prompts, chat=p.data.chat, max_len=p.data.max_len))
        return models[name]

    @functools.cache
    def paired() -> bool:  # do base and tuned give the same tokens on the held-out prompts? (checked once)
        (_, tb, eb), (_, tt, et) = load("base"), load("tuned")
        return tb.get_vocab() == tt.get_vocab() and all(eb.ids[r] == et.ids[r] for r in val)

    for layer in s.layers:
        site = f"L{layer}.resid_post"
        rows = source_rows(base, s.view, val)
        for source in s.sources:
            sae = load_sae(P.sae_dir(source, layer))
            m = eval_sae(sae, read_source(source, base, tuned, site, s.view, rows))
            # splice the reconstruction into the model(s) it was trained on (delta / crosscoder: both)
            names = ("base", "tuned") if source in ("delta", "crosscoder") else (source,)
            loaded = {n: load(n) for n in names}
            encs = {n: v[2] for n, v in loaded.items()}
            if len(names) == 2 and not paired():
                print(f"sae_eval: {source}_L{layer}: base and tuned tokenisers differ, so tokens do not pair up: "
                      "no spliced metrics")
            else:
                sp = spliced_metrics({n: v[0] for n, v in loaded.items()}, encs, val, Site(layer), sae,
                                     source=source, batch_size=p.extract.batch_size,
                                     positions="all" if s.view == "tokens" else "decision",
                                     pad=pad_id(loaded[names[-1]][1]))
                m.update({k: v for k, v in sp.items() if k.startswith(("ce_", "kl_"))})
            if source == "crosscoder":
                rel = sae.relative_norms(block=1).numpy()  # share of the tuned decoder
                m.update({"n_base_only": int((rel < 0.1).sum()), "n_tuned_only": int((rel > 0.9).sum()),
                          "n_shared": int(((rel >= 0.3) & (rel <= 0.7)).sum())})
                hist, edges = np.histogram(rel, bins=20, range=(0.0, 1.0))
                norm_rows += [{"layer": layer, "rel_norm_tuned": round(float(e), 3), "n_latents": int(h)}
                              for e, h in zip(edges[:-1] + 0.025, hist)]
            metrics[f"{source}_L{layer}"] = m
            rec = "  ".join(f"{k} {v:.3f}" for k, v in m.items() if k.startswith("ce_recovered"))
            print(f"sae_eval: {source}_L{layer}: fvu {m['fvu']:.3f} l0 {m['l0']:.1f} dead {m['dead_pct']:.1f}%  {rec}")
    if not norm_rows:  # no crosscoder configured: keep the declared figure, saying so
        norm_rows = [{"layer": -1, "rel_norm_tuned": 0.5, "n_latents": 0}]
    write_csv(P.plot("crosscoder_norms.csv"), norm_rows)
    plot_series(P.plot("crosscoder_norms.csv"), P.plot("crosscoder.png"), x="rel_norm_tuned", y="n_latents",
                group="layer", title="crosscoder latents by tuned decoder-norm share (0 = base-only, 1 = tuned-only)")
    write_json(P.metric("sae.json"), metrics)


if __name__ == "__main__":
    run_stage(main)
