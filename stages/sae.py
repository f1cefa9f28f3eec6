"""Stage sae@<source>-<layer>: train one TopK SAE (base / tuned / delta) or crosscoder at L<layer>.resid_post, or
import a pretrained one (`sae.pretrained`: Gemma Scope, SAELens or mechdiff files) for base / tuned.

With `sae.nproc` > 1 the stage runs torchrun: `sae.parallel: many` trains every pending SAE of sources x
layers at once, spread over the processes (this stage's and its siblings'; each sibling stage then finds its
finished SAE and only writes its table), `ddp` trains this stage's SAE data-parallel over the processes.
"""

import hashlib
import json
import math
import sys
from pathlib import Path

import numpy as np

import mechdiff.pipeline as P
import mechdiff.sae as _sae_pkg
from mechdiff import dist
from mechdiff.data import store as _store_mod
from mechdiff.errors import MechdiffError
from mechdiff.io import run_stage, write_csv
from mechdiff.params import load_params
from mechdiff.resume import (
    environment,
    files_digest,
    fingerprint,
    finished_output,
    mark_complete,
    prepare_output,
)
from mechdiff.sae import SAEConfig, eval_sae, save_sae, train_sae
from mechdiff.sae.pretrained import digest, load_pretrained, resolve
from mechdiff.sae.sources import (
    SOURCES,
    check_finite,
    holdout_prompts,
    init_seed,
    read_source,
    rows_of,
    source_batches,
)

MAX_VAL_ROWS = 4096  # held-out rows for the plateau check (a seeded subsample of the held-out prompts' rows)


def code_hash() -> str:
    """Hash of the code that trains an SAE: a finished SAE is reused by a sibling stage only if it is the same."""
    files = sorted([*Path(_sae_pkg.__file__).parent.glob("*.py"), Path(_store_mod.__file__), Path(__file__)])
    return fingerprint([files_digest(f) for f in files])


def job(p, base, tuned, source: str, layer: int):
    """(site, out dir, fingerprint) of one SAE; validates that its inputs exist."""
    s = p.sae
    site = f"L{layer}.resid_post"
    if site not in base.sites or s.view not in base.views(site):
        raise MechdiffError(f"{site}/{s.view} is not in the activation store: add {layer} to sae.layers and rerun extract")
    training = [s.view, s.expansion, s.k, s.k_aux, s.batchtopk, s.lr, s.batch_size, s.epochs, s.tokens, s.holdout,
                s.eval_every, s.plateau_tol, s.patience, s.select_dtype, MAX_VAL_ROWS]
    if source == "crosscoder" and s.crosscoder_scale != "joint":  # the joint default keeps earlier fingerprints
        training.append(s.crosscoder_scale)
    # the activations themselves (their running statistics), not only the settings that made the stores
    data = hashlib.sha256(b"".join(a.tobytes() for st in (base, tuned) for a in st.stats(site, s.view))).hexdigest()
    fp = fingerprint([training, p.seed, source, layer, base.attrs.get("fingerprint"), tuned.attrs.get("fingerprint"),
                      data[:16], code_hash(), environment()])
    return site, P.sae_dir(source, layer), fp


def checked_rows(p, base, tuned, source: str, site: str):
    """(training rows, held-out rows) of the SAE, after checking its inputs: a bad store must not cost the old SAE."""
    trained, held = holdout_prompts(base.rows_where(split="train"), p.sae.holdout, p.seed)
    rows = rows_of(source, base, tuned, p.sae.view, trained)  # delta/crosscoder: paired
    val_rows = rows_of(source, base, tuned, p.sae.view, held)
    if len(val_rows) > MAX_VAL_ROWS:
        val_rows = np.sort(np.random.default_rng(p.seed).choice(val_rows, size=MAX_VAL_ROWS, replace=False))
    check_finite(source, base, tuned, site, p.sae.view, rows)
    check_finite(source, base, tuned, site, p.sae.view, val_rows)
    return rows, val_rows


def sae_config(p, base, source: str, layer: int) -> SAEConfig:
    """The validated training config of one SAE: a bad config fails before anything trained before is touched."""
    s = p.sae
    site = f"L{layer}.resid_post"
    d = base.width(site)
    per_model = s.crosscoder_scale == "per_model"
    cfg = SAEConfig(d_in=d, width=s.expansion * d, k=s.k, k_aux=s.k_aux, lr=s.lr, batch_size=s.batch_size,
                    batchtopk=s.batchtopk, n_blocks=2 if source == "crosscoder" else 1,
                    seed=init_seed(p.seed, source), eval_every=s.eval_every, plateau_tol=s.plateau_tol,
                    patience=s.patience, bf16=s.select_dtype == "bfloat16",
                    block_scale=per_model and source == "crosscoder",
                    meta={"site": site, "source": source, "view": s.view, "layer": layer})
    try:
        cfg.validate()
    except MechdiffError as e:
        raise MechdiffError(f"sae.{str(e).removeprefix('SAEConfig.')} (sae.expansion x the site width {d} = "
                            f"{cfg.width} latents)") from e
    return cfg


def train_one(p, base, tuned, source: str, layer: int, *, ddp: bool = False, prepare: bool = True,
              rows=None, cfg: SAEConfig | None = None) -> None:
    """Train (or resume) one SAE into its out dir and mark it complete (rank 0 only writes under ddp); `rows` and
    `cfg` where the caller has checked them already."""
    s = p.sae
    site, out, fp = job(p, base, tuned, source, layer)
    if rows is None:
        rows = checked_rows(p, base, tuned, source, site)
    rows, val_rows = rows
    cfg = cfg or sae_config(p, base, source, layer)
    has_checkpoint = (out / "checkpoints" / "latest.json").is_file()
    resumed = prepare_output(out, fp) if prepare else has_checkpoint
    if resumed:
        print(f"sae: resuming {out} from its last checkpoint" if has_checkpoint
              else f"sae: {out} has no checkpoint yet (interrupted before its first): training from the start",
              flush=True)
    total = min(s.tokens, len(rows) * s.epochs)  # the budget: whichever cap comes first
    batches = source_batches(source, base, tuned, site, s.view, rows, batch_size=s.batch_size, seed=p.seed,
                             epochs=math.ceil(total / max(1, len(rows))))
    val = read_source(source, base, tuned, site, s.view, val_rows) if len(val_rows) >= 2 else None
    train_sae(batches, cfg, out, total_tokens=total, resume=resumed, ddp=ddp,
              progress=dist.rank_world()[0] == 0, device=dist.device_for_rank(s.device), val=val)
    if dist.rank_world()[0] == 0:
        mark_complete(out)


def pretrained_spec(p, source: str, layer: int) -> str | None:
    """The `sae.pretrained` spec of this SAE (key "<source>-<layer>"), or None: trained here."""
    return p.sae.pretrained.get(f"{source}-{layer}")


def import_one(p, base, tuned, source: str, layer: int, spec: str) -> None:
    """Import a pretrained SAE into the SAE's out dir (checked against the site width first), with its FVU on
    held-out rows as a one-entry training log; a finished import of the same files and data is kept."""
    s = p.sae
    site, out, data_fp = job(p, base, tuned, source, layer)  # data_fp: the store, seed and holdout behind the FVU
    local = str(resolve(spec))  # an hf: spec is fetched once
    sha = digest(local)
    fp = fingerprint(["pretrained", spec, sha, data_fp])
    if finished_output(out, fp):
        print(f"sae: {out} already holds {spec}")
        return
    sae = load_pretrained(local, d_in=base.width(site))  # a wrong file fails before the old SAE is touched
    rows, val_rows = checked_rows(p, base, tuned, source, site)
    if len(val_rows) < 2:  # no held-out prompts (sae.holdout 0): a seeded sample of the train rows
        rng = np.random.default_rng(p.seed)
        val_rows = np.sort(rng.choice(rows, size=min(len(rows), MAX_VAL_ROWS), replace=False))
    prepare_output(out, fp)
    m = eval_sae(sae, read_source(source, base, tuned, site, s.view, val_rows))
    save_sae(sae, out, meta={"site": site, "source": source, "view": s.view, "layer": layer, "pretrained": spec,
                             "pretrained_sha256": sha, "stop_reason": "imported (sae.pretrained)",
                             "val_fvu": m["fvu"]})
    log = [{"step": 0, "tokens": 0, "fvu": m["fvu"], "l0": m["l0"], "dead_pct": m["dead_pct"], "val_fvu": m["fvu"]}]
    (out / "train_log.json").write_text(json.dumps(log, indent=1))
    mark_complete(out)


def worker(p, argv: list[str]) -> None:
    """One torchrun rank: `--all` trains its share of the pending SAEs, else its share of one SAE (ddp)."""
    dist.init(dist.backend_for(p.sae.device))
    base, tuned = P.open_stores()
    if argv[0] == "--all":
        jobs = [(src, layer) for src in p.sae.sources for layer in p.sae.layers
                if pretrained_spec(p, src, layer) is None]  # imports run in their own stages
        pending = [(src, layer) for src, layer in jobs
                   if not finished_output(*job(p, base, tuned, src, layer)[1:])]  # job() hashes code + stats once
        dist.barrier()  # every rank has listed the pending SAEs before any starts training
        for src, layer in dist.my_share(pending):
            train_one(p, base, tuned, src, layer)
    else:
        train_one(p, base, tuned, argv[0], int(argv[1]), ddp=True, prepare=False)
    dist.close()


def train_here(p, base, tuned, source: str, layer: int, site: str, out: Path, fp: str) -> None:
    """Train this stage's SAE: in this process, or under torchrun (`sae.nproc` > 1)."""
    s = p.sae
    rows = checked_rows(p, base, tuned, source, site)  # inputs first, whatever was trained before
    cfg = sae_config(p, base, source, layer)  # and the config, before a ddp launch prepares the output
    if s.nproc == 1:
        train_one(p, base, tuned, source, layer, rows=rows, cfg=cfg)  # a finished SAE is replaced, as every stage does
    else:
        if not finished_output(out, fp):  # a sibling's many-run may have trained it already
            if s.parallel == "ddp":
                prepare_output(out, fp)  # before the ranks start: they only resume from its checkpoints
                dist.launch([__file__, source, str(layer)], s.nproc, what=f"sae {source} L{layer}")
            else:
                dist.launch([__file__, "--all"], s.nproc, what="sae (all sources x layers)")
        if not finished_output(out, fp):
            train_one(p, base, tuned, source, layer, rows=rows, cfg=cfg)


def main() -> None:
    argv = sys.argv[1:]
    p = load_params()
    s = p.sae
    if dist.in_worker():
        return worker(p, argv)
    if len(argv) != 2 or argv[0] not in SOURCES:
        raise MechdiffError(f"usage: python stages/sae.py {{{'|'.join(SOURCES)}}} <layer>")
    if not argv[1].lstrip("-").isdigit():
        raise MechdiffError(f"usage: python stages/sae.py {{{'|'.join(SOURCES)}}} <layer>: the layer must be an "
                            f"integer, got {argv[1]!r}")
    source, layer = argv[0], int(argv[1])
    base, tuned = P.open_stores()
    site, out, fp = job(p, base, tuned, source, layer)
    spec = pretrained_spec(p, source, layer)
    if spec is not None:
        import_one(p, base, tuned, source, layer, spec)
    else:
        train_here(p, base, tuned, source, layer, site, out, fp)
    log = json.loads((out / "train_log.json").read_text())
    write_csv(P.plot(f"sae/{source}_L{layer}.csv"), log)
    last = log[-1] if log else {}
    meta = json.loads((out / "cfg.json").read_text()) if (out / "cfg.json").is_file() else {}
    val_fvu = meta.get("val_fvu")
    print(f"sae: {source} {site}: {last.get('tokens', 0)} tokens ({meta.get('stop_reason', 'stop reason unknown')}), "
          f"final fvu {last.get('fvu', float('nan')):.3f}"
          + (f", held-out fvu {val_fvu:.3f}" if val_fvu is not None else "")
          + (f" ({s.nproc} processes, {s.parallel})" if s.nproc > 1 and spec is None else ""))


if __name__ == "__main__":
    run_stage(main)
