"""Stage probes: hidden -> concept, hidden -> feature and embedding -> feature probes at every stored layer for base
and tuned (grouped CV on train, held-out test), the estimators compared at the SAE layers, SAE sparse probing and
the relative reconstruction bias of every SAE."""

import time

import numpy as np

import mechdiff.pipeline as P
from mechdiff.analysis.probe_run import ProbeRunSettings, layer_table, plot_layers, run_probes
from mechdiff.analysis.probes import ProbeSettings
from mechdiff.dist import available_cpus
from mechdiff.io import run_stage, write_csv, write_json
from mechdiff.params import load_params
from mechdiff.sae import load_sae


def input_embedding_matrix(which: str) -> np.ndarray:
    """The input-embedding matrix (vocab, d) of saved model `which`."""
    from mechdiff.model.load import load_saved

    model, _ = load_saved(P.model_dir(which))  # float32: the saved weights exactly, whatever pair.dtype
    E = model.get_input_embeddings().weight.detach().float().numpy()
    del model
    return E


def main() -> None:
    p = load_params()
    pr, s = p.probes, p.sae
    t0 = time.time()
    settings = ProbeRunSettings(
        sae_layers=tuple(s.layers), sae_view=s.view, view=pr.view, feature_view=pr.feature_view, target=pr.target,
        control=pr.control, estimators=tuple(pr.estimators), n_features=pr.n_features, embedding=pr.embedding,
        sparse_k=tuple(pr.sparse_k), concat_layers=pr.concat_layers if isinstance(pr.concat_layers, str) else tuple(pr.concat_layers),
        probe=ProbeSettings(folds=pr.folds, C=pr.C, ridge_alpha=pr.ridge_alpha, n_trees=pr.n_trees, seed=p.seed,
                            n_jobs=pr.n_jobs or available_cpus()))
    base, tuned = P.open_stores()
    prompts = P.kept_prompts()
    saes = {(src, layer): load_sae(P.sae_dir(src, layer)) for layer in s.layers for src in s.sources}
    units = P.stage_units("probes")  # an interrupted run resumes each finished family of probes
    run = run_probes(base, tuned, prompts, saes, input_embedding_matrix, settings, progress=print, t0=t0, units=units)
    run.metrics["seconds"] = time.time() - t0

    write_csv(P.plot("probes_layers.csv"), layer_table(run.rows))
    write_csv(P.plot("probes_sparse.csv"), run.sparse_rows)
    plot_layers(run.rows, P.plot("probes_layers.png"))
    write_json(P.metric("probes.json"), run.metrics)
    units.done()
    print(f"probes: done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    run_stage(main)
