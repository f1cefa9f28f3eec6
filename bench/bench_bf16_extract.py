"""bf16 extraction of the default pair's base store (every site and view of `extract`), its shared-prefix cache
checked on a float32 copy of the weights (`sites.float32_twin`, the default) against the check in bf16 (which fails
on bf16's own rounding at SmolLM2's L20.attn_out, so the extraction runs full forwards); interleaved rounds in one
process, stores written to /tmp. Prints seconds per round and how far each bf16 store is from the float32 store.

    .venv/bin/python bench/bench_bf16_extract.py [ROUNDS]     # in a repository after `make run`
"""
import shutil
import sys
import time
import warnings

import numpy as np

import mechdiff.model.sites as S
import mechdiff.pipeline as P
from mechdiff.data.extract import extract
from mechdiff.data.store import ActStore
from mechdiff.model.load import load_saved
from mechdiff.model.sites import Site, n_layers, plan_sites
from mechdiff.params import load_params
from mechdiff.pipeline import kept_prompts

p = load_params()
e = p.extract
model, tok = load_saved(P.model_dir("base"), dtype="bfloat16")
prompts = kept_prompts()
plan = plan_sites(n_layers(model), stride=e.layer_stride, detail_layers=e.detail_layers,
                  extra=p.transport.sites, token_layers=p.sae.layers)
sites = [Site.parse(s) for s in plan]
real = S.float32_twin
times = {"new": [], "old": []}
stores = {}
for _round in range(int(sys.argv[1]) if len(sys.argv) > 1 else 1):
    for mode in ("old", "new"):
        S.float32_twin = real if mode == "new" else (lambda m, **k: None)
        out = f"/tmp/bf16x_{mode}.zarr"
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            st = extract(model, tok, prompts, sites, plan, out, batch_size=e.batch_size, dtype="bfloat16",
                         chat=p.data.chat, max_len=p.data.max_len, store_logits=e.store_logits, progress=False)
        times[mode].append(time.perf_counter() - t)
        stores[mode] = st
        print(mode, f"{times[mode][-1]:.1f} s", [str(x.message)[:120] for x in w if "shared-prefix" in str(x.message)], flush=True)
S.float32_twin = real
for s in ["L20.attn_out", "L20.resid_post", "L28.resid_post", "L26.mlp_out"]:
    for v in ("mean", "last"):
        a, b = stores["new"].read(s, v), stores["old"].read(s, v)
        print(s, v, "rel diff cached vs full bf16", float(np.linalg.norm(a - b) / np.linalg.norm(b)))
print({k: [round(x, 1) for x in v] for k, v in times.items()})
f32 = ActStore.open(P.acts_path("base"))
for s in ["L20.attn_out", "L20.resid_post", "L28.resid_post", "L26.mlp_out"]:
    ref = f32.read(s, "mean")
    print(s, "mean vs float32 store: cached", float(np.linalg.norm(stores["new"].read(s, "mean") - ref) / np.linalg.norm(ref)),
          "full", float(np.linalg.norm(stores["old"].read(s, "mean") - ref) / np.linalg.norm(ref)))
