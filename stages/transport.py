"""Stage transport@<site>: fit a base -> tuned map on train decision-token vectors, report on val."""

import sys

import mechdiff.pipeline as P
from mechdiff.analysis.transport import fit_site, save_map
from mechdiff.errors import MechdiffError
from mechdiff.io import run_stage, write_json
from mechdiff.model.sites import Site
from mechdiff.params import load_params


def main() -> None:
    if len(sys.argv) != 2:
        raise MechdiffError("usage: python stages/transport.py <site, e.g. L20.attn_out>")
    site = sys.argv[1]
    try:
        Site.parse(site)
    except MechdiffError as e:
        said = str(e) if site in str(e) else f"{site}: {e}"
        raise MechdiffError(f"usage: python stages/transport.py <site, e.g. L20.attn_out>: {said}") from e
    p = load_params()
    t = p.transport
    base, tuned = P.open_stores()
    if site not in base.sites:
        raise MechdiffError(f"site {site} is not in the activation store: add it to transport.sites and rerun extract")
    m, metrics = fit_site(base.read(site, "last"), tuned.read(site, "last"), base.rows_where(split="train"),
                          base.rows_where(split="val"), solver=t.solver, shrink=t.shrink, rank_mode=t.rank_mode,
                          site=site, seed=p.seed)
    save_map(m, P.map_dir(site))
    write_json(P.metric(f"transport/{site}.json"), metrics)
    print(f"transport: {site} {t.solver}: val R2 {metrics['r2_val']:.3f}, alpha {m.alpha:.3f}")


if __name__ == "__main__":
    run_stage(main)
