"""Stage geometry: concept geometry under the causal inner product for base and tuned (whitening check, concept
vectors, hierarchical orthogonality with controls, separation, the children's polytopes, parent and child
interventions, context vectors), and how the pair
differs; saves each model's vectors and the H-SAE teacher directions."""

import functools
import time

import numpy as np

import mechdiff.pipeline as P
from mechdiff.analysis.geometry import (
    compare_pair,
    cosine_matrix,
    final_norm_weight,
    hidden_direction,
    hidden_metric,
    hierarchy,
    model_geometry,
)
from mechdiff.data.corpus import load_concepts
from mechdiff.io import run_stage, to_jsonable, write_csv, write_json
from mechdiff.model.fast import pack_for_inference
from mechdiff.model.load import load_saved
from mechdiff.params import load_params


def teacher_arrays(geo, model) -> dict:
    """Parent and child-delta directions in the residual stream (the H-SAE teacher) and the causal metric there."""
    w = final_norm_weight(model)
    parents = [c for c in geo.cs.concepts if c.is_parent and c.name in geo.vectors]
    kids = [[c for c in geo.cs.concepts if c.parent == p.name and c.name in geo.vectors] for p in parents]
    C = max([len(k) for k in kids] + [1])
    d = len(next(iter(geo.vectors.values())))
    par = np.stack([hidden_direction(geo.vectors[p.name], geo.whitening, w) for p in parents])
    ch = np.zeros((len(parents), C, d))
    n_ch = np.zeros(len(parents), dtype=np.int64)
    for i, (p, ks) in enumerate(zip(parents, kids)):
        for j, k in enumerate(ks):
            ch[i, j] = hidden_direction(geo.vectors[k.name] - geo.vectors[p.name], geo.whitening, w)
        n_ch[i] = len(ks)
    test = [geo.cs.test[p.name] for p in parents]
    return {"parent_names": np.array([p.name for p in parents]), "teacher_parents": par, "teacher_children": ch,
            "n_children": n_ch, "metric": hidden_metric(geo.whitening, w),
            "test_tokens": np.concatenate(test), "test_offsets": np.cumsum([0] + [len(t) for t in test]),
            "words": np.array(sorted(geo.cs.split)), "word_split": np.array([geo.cs.split[w] for w in sorted(geo.cs.split)])}


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def summary_rows(metrics: dict) -> list[dict]:
    """Median parent / child-delta angle per model: the real geometry beside its controls."""
    rows = []
    for which in ("base", "tuned"):
        m = metrics[which]
        for label, part in (("causal (LDA)", m), *((f"control: {k}", v) for k, v in m["controls"].items()),
                            ("contexts", m["context"])):
            if part.get("median_child") is not None:
                rows.append({"label": f"{which} {label}", "median_angle": round(part["median_child"], 3)})
    return rows


def main() -> None:
    p = load_params()
    g = p.geometry
    t0 = time.time()
    concepts = hierarchy(load_concepts(p.data.dir))
    geos, metrics = {}, {}
    units = P.stage_units("geometry")  # an interrupted run resumes each model's finished geometry

    def one_model(which: str) -> tuple:
        model, tok = load_saved(P.model_dir(which), dtype=p.pair.dtype)
        pack_for_inference(model, avx512_fp32=False)  # numbers as unpacked on Intel AVX-512 fp32
        geo = model_geometry(model, tok, concepts, method=g.estimator, test_frac=g.test_frac, seed=p.seed,
                             prompts=g.prompts, steer_scale=g.steer_scale, batch_size=g.batch_size)
        return geo, teacher_arrays(geo, model)

    for which in ("base", "tuned"):
        geo, teacher = units(f"model/{which}", functools.partial(one_model, which))
        geos[which] = geo
        metrics[which] = geo.summary
        names = geo.cs.names
        out = P.geometry_file(which)
        out.parent.mkdir(parents=True, exist_ok=True)
        np.savez(out, names=np.array(names), vectors=np.stack([geo.vectors[n] for n in names]),
                 **teacher)
        s = geo.summary
        print(f"geometry: {which}: {s['coverage']['words']}/{s['coverage']['words_total']} words single tokens, "
              f"median child angle {_fmt(s['median_child'])} deg (random parents "
              f"{_fmt(s['controls']['random_parents']['median_child'])}; orthogonality "
              f"{'holds' if s['orthogonality']['holds'] else 'does not hold'}), separation AUC {_fmt(s['separation_auc'])}, "
              f"children at their own vertex {_fmt(s['polytope']['accuracy'])} (chance {_fmt(s['polytope']['chance'])})")
    pair, pair_rows = compare_pair(geos["base"], geos["tuned"])
    metrics["pair"] = pair
    metrics["seconds"] = time.time() - t0
    write_json(P.metric("geometry.json"), metrics)
    write_csv(P.plot("geometry_angles.csv"), [{"model": w, **r} for w, geo in geos.items() for r in geo.angles])
    base = geos["base"]
    names = base.cs.names
    cos = cosine_matrix(base.vectors, names)
    write_csv(P.plot("geometry_cos.csv"), [{"row": a, "col": b, "cos": round(float(cos[i, j]), 4)}
                                           for i, a in enumerate(names) for j, b in enumerate(names)])
    write_csv(P.plot("geometry_pair.csv"), pair_rows)
    write_csv(P.plot("geometry_parents.csv"), [{"concept": r["concept"], "shift": round(r["shift"], 5),
                                                 "cos_context": round(r["cos_context"], 5)}
                                                for r in sorted(pair_rows, key=lambda r: -r["shift"])
                                                if r["level"] == "parent"])
    write_csv(P.plot("geometry_summary.csv"), summary_rows(metrics))
    for name, attr in (("geometry_polytope.csv", "polytope"), ("geometry_children.csv", "child_interventions")):
        write_csv(P.plot(name), [{"model": w, **to_jsonable(r, digits=5)}
                                 for w, geo in geos.items() for r in getattr(geo, attr)])
    write_csv(P.plot("geometry_concepts.csv"),
              [{"model": w, **r, **next((x for x in geo.interventions if x["concept"] == r["concept"]), {})}
               for w, geo in geos.items() for r in geo.separation])
    print(f"geometry: pair: min unembedding cos {_fmt(pair['min_cos_unembedding'])}, median context cos "
          f"{_fmt(pair['median_cos_context'])}, most moved {pair['most_moved'][:3]}")
    units.done()


if __name__ == "__main__":
    run_stage(main)
