"""Stage extract@<model>: run one model over the kept prompts and write artifacts/acts/<model>.zarr.

An interrupted run resumes from the store's last committed shard (mechdiff.resume); a finished store or one
made with other settings is replaced, and only after the model and prompts have loaded.

With `extract.nproc` > 1 the stage starts that many processes under torchrun (each runs this script and
extracts a shard-aligned slice of the prompts into the same store). On several machines, start torchrun on
each yourself with its rendezvous flags (README, "Scale out"), then `dvc commit extract@<model>`.
"""

import resource
import sys

import mechdiff.pipeline as P
from mechdiff import dist
from mechdiff.data.extract import extract
from mechdiff.data.store import ActStore
from mechdiff.errors import MechdiffError
from mechdiff.io import run_stage
from mechdiff.model.load import META_FILE, load_saved
from mechdiff.model.sites import Site, n_layers, plan_sites
from mechdiff.params import load_params
from mechdiff.pipeline import kept_prompts
from mechdiff.resume import fingerprint, prepare_output, store_record


def main() -> None:
    which = sys.argv[1] if len(sys.argv) == 2 else ""
    if which not in ("base", "tuned"):
        raise MechdiffError("usage: python stages/extract.py base|tuned")
    p = load_params()
    e = p.extract
    path = P.acts_path(which)
    if e.nproc > 1 and not dist.in_worker():
        dist.launch([__file__, which], e.nproc, what=f"extract {which}")
        store = ActStore.open(path)
        if not store.complete:
            ActStore.open(path, "r+").finalize_ranks(e.nproc)
        print(f"extract: {which}: {store.n} prompts -> {path} ({e.nproc} processes)")
        return
    rank, world = dist.init(dist.backend_for(e.device))
    model, tok = load_saved(P.model_dir(which), dtype=e.dtype, device=dist.device_for_rank(e.device))
    prompts = kept_prompts()
    plan = plan_sites(n_layers(model), stride=e.layer_stride, detail_layers=e.detail_layers,
                      extra=p.transport.sites, token_layers=p.sae.layers)
    sites = [Site.parse(s) for s in plan]
    model_meta = P.model_dir(which) / META_FILE
    fp = fingerprint([plan, extract_attrs(e), p.data.chat, p.data.max_len, [q.pid for q in prompts],
                      model_meta.read_text() if model_meta.exists() else which])
    if rank == 0 and prepare_output(path, fp, record=store_record, create=False):
        done = store_record(path).get("rows_done", 0)
        print(f"extract: resuming {path}" + (f" from row {done}" if world == 1 else ""), flush=True)
    store = extract(model, tok, prompts, sites, plan, str(path), batch_size=e.batch_size,
                    dtype=e.dtype, chat=p.data.chat, max_len=p.data.max_len, store_logits=e.store_logits,
                    device=dist.device_for_rank(e.device), shard_rows=e.shard_rows, resume=True,
                    pack_weights=e.pack_weights, store_dtype=e.store_dtype, compressor=e.compressor, attrs={"model": which, "fingerprint": fp, "extract": extract_attrs(e)})
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"extract: {which}: {store.n} prompts x {len(sites)} sites -> {path}"
          + (f" [rank {rank}/{world}]" if world > 1 else "") + f", peak RSS {rss:.0f} MB")
    dist.close()


def extract_attrs(e) -> dict:
    """The extract params that shape the store's contents (nproc only changes how it is computed)."""
    return {k: v for k, v in vars(e).items() if k != "nproc"}


if __name__ == "__main__":
    run_stage(main)
