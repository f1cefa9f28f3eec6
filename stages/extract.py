"""Stage extract@<model>: run one model over the kept prompts and write artifacts/acts/<model>.zarr.

An interrupted run resumes from the store's last committed shard (mechdiff.resume); a finished store or one
made with other settings is replaced, and only after the model and prompts have loaded.
"""

import sys

import mechdiff.pipeline as P
from mechdiff.data.extract import extract
from mechdiff.errors import MechdiffError
from mechdiff.io import run_stage
from mechdiff.model.load import META_FILE, load_saved
from mechdiff.model.sites import Site, n_layers, plan_sites
from mechdiff.params import load_params
from mechdiff.pipeline import kept_prompts
from mechdiff.resume import fingerprint, prepare_output, store_record


def main() -> None:
    which = sys.argv[1] if len(sys.argv) > 1 else ""
    if which not in ("base", "tuned"):
        raise MechdiffError("usage: python stages/extract.py base|tuned")
    p = load_params()
    e = p.extract
    model, tok = load_saved(P.model_dir(which), dtype=e.dtype, device=e.device)
    prompts = kept_prompts()
    plan = plan_sites(n_layers(model), stride=e.layer_stride, detail_layers=e.detail_layers,
                      extra=p.transport.sites, token_layers=p.sae.layers)
    sites = [Site.parse(s) for s in plan]
    path = P.acts_path(which)
    model_meta = P.model_dir(which) / META_FILE
    fp = fingerprint([plan, vars(e), p.data.chat, p.data.max_len, [q.pid for q in prompts],
                      model_meta.read_text() if model_meta.exists() else which])
    if prepare_output(path, fp, record=store_record, create=False):
        print(f"extract: resuming {path} from row {store_record(path)['rows_done']}")
    store = extract(model, tok, prompts, sites, plan, str(path), batch_size=e.batch_size,
                    dtype=e.dtype, chat=p.data.chat, max_len=p.data.max_len, store_logits=e.store_logits,
                    device=e.device, shard_rows=e.shard_rows, resume=True, pack_weights=e.pack_weights,
                    attrs={"model": which, "fingerprint": fp, "extract": vars(e)})
    print(f"extract: {which}: {store.n} prompts x {len(sites)} sites -> {path}")


if __name__ == "__main__":
    run_stage(main)
