"""Stage extract@<model>: run one model over the kept prompts and write artifacts/acts/<model>.zarr."""

import sys

import numpy as np

from mechdiff.corpus import load_prompts
from mechdiff.errors import MechdiffError
from mechdiff.extract import extract
from mechdiff.io import run_stage
from mechdiff.pair import load_saved
from mechdiff.params import load_params
from mechdiff.sites import Site, n_layers, plan_sites


def main() -> None:
    which = sys.argv[1] if len(sys.argv) > 1 else ""
    if which not in ("base", "tuned"):
        raise MechdiffError("usage: python stages/extract.py base|tuned")
    p = load_params()
    e = p.extract
    model, tok = load_saved(f"artifacts/models/{which}", dtype=e.dtype, device=e.device)
    keep = set(np.load("artifacts/prompts/fairness.npz")["kept_pids"].tolist())
    prompts = [q for q in load_prompts("artifacts/prompts/prompts.jsonl") if q.pid in keep]
    if not prompts:
        raise MechdiffError("no prompts left after the fairness filter: relax pair.fairness.mode to ratio")
    plan = plan_sites(n_layers(model), stride=e.layer_stride, detail_layers=e.detail_layers,
                      extra=p.transport.sites, token_layers=p.sae.layers)
    sites = [Site.parse(s) for s in plan]
    store = extract(model, tok, prompts, sites, plan, f"artifacts/acts/{which}.zarr", batch_size=e.batch_size,
                    dtype=e.dtype, chat=p.data.chat, max_len=p.data.max_len, store_logits=e.store_logits,
                    device=e.device, shard_rows=e.shard_rows, attrs={"model": which, "params": vars(e)})
    print(f"extract: {which}: {store.n} prompts x {len(sites)} sites -> artifacts/acts/{which}.zarr")


if __name__ == "__main__":
    run_stage(main)
