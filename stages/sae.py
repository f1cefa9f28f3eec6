"""Stage sae@<source>-<layer>: train one TopK SAE (base / tuned / delta) or crosscoder at L<layer>.resid_post."""

import sys

import mechdiff.pipeline as P
from mechdiff.errors import MechdiffError
from mechdiff.io import run_stage, write_csv
from mechdiff.params import load_params
from mechdiff.resume import fingerprint, mark_complete, prepare_output
from mechdiff.sae import SAEConfig, train_sae
from mechdiff.sae.sources import SOURCES, check_finite, init_seed, rows_of, source_batches


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[1] not in SOURCES:
        raise MechdiffError(f"usage: python stages/sae.py {{{'|'.join(SOURCES)}}} <layer>")
    source, layer = sys.argv[1], int(sys.argv[2])
    p = load_params()
    s = p.sae
    site = f"L{layer}.resid_post"
    base, tuned = P.open_stores()
    if site not in base.sites or s.view not in base.views(site):
        raise MechdiffError(f"{site}/{s.view} is not in the activation store: add {layer} to sae.layers and rerun extract")
    rows = rows_of(source, base, tuned, s.view, base.rows_where(split="train"))  # delta/crosscoder: paired or raise
    check_finite(source, base, tuned, site, s.view, rows)  # inputs first: a bad store must not cost the old SAE
    d = base.width(site)
    cfg = SAEConfig(d_in=d, width=s.expansion * d, k=s.k, k_aux=s.k_aux, lr=s.lr, batch_size=s.batch_size,
                    batchtopk=s.batchtopk, n_blocks=2 if source == "crosscoder" else 1,
                    seed=init_seed(p.seed, source),
                    meta={"site": site, "source": source, "view": s.view, "layer": layer})
    out = P.sae_dir(source, layer)
    training = [s.view, s.expansion, s.k, s.k_aux, s.batchtopk, s.lr, s.batch_size, s.epochs]
    resumed = prepare_output(out, fingerprint([training, p.seed, source, layer, base.attrs.get("fingerprint"),
                                               tuned.attrs.get("fingerprint")]))
    if resumed:
        print(f"sae: resuming {out} from its last checkpoint")
    batches = source_batches(source, base, tuned, site, s.view, rows, batch_size=s.batch_size, seed=p.seed,
                             epochs=s.epochs)
    sae = train_sae(batches, cfg, out, total_tokens=len(rows) * s.epochs, resume=resumed)
    mark_complete(out)
    write_csv(P.plot(f"sae/{source}_L{layer}.csv"), sae.train_log)
    last = sae.train_log[-1] if sae.train_log else {}
    print(f"sae: {source} {site}: {len(rows)} rows x {s.epochs} epochs, final fvu {last.get('fvu', float('nan')):.3f}")


if __name__ == "__main__":
    run_stage(main)
