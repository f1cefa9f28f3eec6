"""Stage hsae: hierarchical SAEs on L<layer>.resid_post of base and tuned, random vs teacher initialisation (the
teacher from the geometry stage's concept vectors); reconstruction, CE/KL recovered, purity, leakage and steering
leakage on concept contexts, the seed's targets, and which parents' children the tuning changed."""

import hashlib
import time

import numpy as np

import mechdiff.pipeline as P
import mechdiff.sae.hsae as hsae_module
import mechdiff.sae.train as train_module
from mechdiff.analysis.geometry import context_states, hierarchy, labelled_contexts
from mechdiff.data.corpus import load_concepts
from mechdiff.errors import MechdiffError
from mechdiff.io import run_stage, write_csv, write_json
from mechdiff.model.fast import pack_for_inference
from mechdiff.model.load import load_saved
from mechdiff.model.sites import Site
from mechdiff.params import load_params
from mechdiff.resume import (
    environment,
    files_digest,
    fingerprint,
    finished_output,
    mark_complete,
    prepare_output,
)
from mechdiff.sae.hsae import (
    HierarchicalSAE,
    compare_children,
    context_teacher,
    evaluate_hsae,
    load_hsae,
    teacher_targets,
)
from mechdiff.sae.sources import check_finite, source_batches, source_rows
from mechdiff.sae.train import SAEConfig, train_sae

VARIANTS = ("random", "teacher")
_SHOWN = ("fvu", "l0", "ce_recovered", "purity", "leakage", "steering_leakage")


def _digest(state: dict) -> str:
    """A hash of an initial state (the teacher directions included)."""
    h = hashlib.sha256()
    for k, v in state.items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    p = load_params()
    h = p.hsae
    t0 = time.time()
    site = Site(h.layer, "resid_post")
    stores = dict(zip(("base", "tuned"), P.open_stores()))
    if site.name not in stores["base"].sites or h.view not in stores["base"].views(site.name):
        raise MechdiffError(f"{site.name}/{h.view} is not in the activation store: set hsae.layer / hsae.view to a "
                            "stored site (every-token rows are kept at sae.layers; `mechdiff sites` lists the store)")
    concepts = hierarchy(load_concepts(p.data.dir))
    prompts = P.kept_prompts()
    val = P.pick_rows(prompts, split="val", n=h.eval_prompts, seed=p.seed)
    metrics: dict = {"site": site.name, "view": h.view}
    code = [files_digest(f) for f in (hsae_module.__file__, train_module.__file__)]
    rows_out, saes, matches = [], {}, {}
    for which in ("base", "tuned"):
        store = stores[which]
        geo = np.load(P.geometry_file(which))
        names = [str(x) for x in geo["parent_names"]]
        off = geo["test_offsets"]
        token_sets = {n: geo["test_tokens"][off[i]:off[i + 1]] for i, n in enumerate(names)}
        split = dict(zip(geo["words"].tolist(), geo["word_split"].tolist()))  # covered words: train | test
        texts, owner, labels, held_out = labelled_contexts(concepts, names, split)  # metrics on held-out words
        model, tok = load_saved(P.model_dir(which), dtype=p.pair.dtype)
        pack_for_inference(model, avx512_fp32=False)  # numbers as unpacked on Intel AVX-512 fp32
        X_ctx = context_states(model, tok, texts, site=site, batch_size=p.geometry.batch_size)
        if h.teacher == "contexts":
            train_words = {w for w, sp in split.items() if sp == "train"}
            kids = [[[w for w in c.words if w in train_words] for c in concepts if c.parent == n] for n in names]
            t_par, t_kids = context_teacher(X_ctx, owner, names, kids,
                                            [[w for ws in k for w in ws] for k in kids])
        else:
            n_ch = geo["n_children"]
            t_par, t_kids = geo["teacher_parents"], [geo["teacher_children"][i, : n_ch[i]] for i in range(len(names))]
        enc = P.encode_prompts(tok, prompts, chat=p.data.chat, max_len=p.data.max_len)
        train_rows = source_rows(store, h.view, store.rows_where(split="train"))
        val_rows = source_rows(store, h.view, val)
        for rows in (train_rows, val_rows):  # a NaN names the store before any H-SAE output is touched
            check_finite(which, stores["base"], stores["tuned"], site.name, h.view, rows)
        X_val = store.read(site.name, h.view, val_rows)
        d = store.width(site.name)
        metrics[which] = {}
        # the teacher must fit hsae.width / hsae.children: checked before the random variant trains
        HierarchicalSAE(d, h.width, h.children, h.k, seed=p.seed).init_teacher(t_par, t_kids)
        for variant in VARIANTS:
            teacher = variant == "teacher"
            m = HierarchicalSAE(d, h.width, h.children, h.k, seed=p.seed, ortho_coef=h.ortho_coef,
                                freeze_steps=h.freeze_steps if teacher else 0,
                                metric=geo["metric"] if h.metric == "causal" else None)
            if teacher:
                m.init_teacher(t_par, t_kids)
            cfg = SAEConfig(d_in=d, width=m.width, k=h.k, lr=h.lr, batch_size=h.batch_size, seed=p.seed, ckpt_every=100,
                            meta={"site": site.name, "view": h.view, "model": which, "variant": variant})
            out = P.hsae_dir(which, variant)
            fp = fingerprint([h.layer, h.view, h.width, h.children, h.k, h.lr, h.batch_size, h.epochs, h.teacher,
                              h.ortho_coef, h.freeze_steps, p.seed, variant, store.attrs.get("fingerprint"),
                              _digest(m.state_dict()), code, environment()])
            if finished_output(out, fp):  # an interrupted run finished this one already
                print(f"hsae: reusing the finished {out}")
            else:
                resumed = prepare_output(out, fp)
                batches = source_batches(which, stores["base"], stores["tuned"], site.name, h.view, train_rows,
                                         batch_size=h.batch_size, seed=p.seed, epochs=h.epochs)
                train_sae(batches, cfg, out, total_tokens=len(train_rows) * h.epochs, resume=resumed, model=m)
                del batches  # and the training rows it may keep in memory
                mark_complete(out)
            m = load_hsae(out)
            res, per, match = evaluate_hsae(
                m, model, tok, enc, val, site, X_val, X_ctx[held_out], labels[held_out], names, p.geometry.prompts,
                token_sets, steer_scale=h.steer_scale, positions="all" if h.view == "tokens" else "decision",
                batch_size=p.extract.batch_size)
            metrics[which][variant] = res
            saes[which, variant], matches[which, variant] = m, match
            rows_out += [{"model": which, "variant": variant, **r} for r in per]
            print(f"hsae: {which} {variant}: " + ", ".join(f"{k} {res[k]:.3f}" if isinstance(res[k], float) else
                                                           f"{k} {res[k]}" for k in _SHOWN))
        metrics[which]["targets"] = teacher_targets(metrics[which]["random"], metrics[which]["teacher"])
        del model
    metrics["pair"], pair_rows = compare_children(saes["base", "teacher"], saes["tuned", "teacher"],
                                                  matches["base", "teacher"], matches["tuned", "teacher"], names)
    metrics["seconds"] = time.time() - t0
    write_json(P.metric("hsae.json"), metrics)
    write_csv(P.plot("hsae_concepts.csv"), rows_out)
    write_csv(P.plot("hsae_pair.csv"), pair_rows)
    write_csv(P.plot("hsae_summary.csv"), [{"label": f"{w} {v}", **{k: metrics[w][v][k] for k in (
        "purity", "leakage", "steering_leakage", "fvu", "ce_recovered")}} for w in ("base", "tuned") for v in VARIANTS])
    for which in ("base", "tuned"):
        print(f"hsae: {which} targets: {metrics[which]['targets']['met']}")


if __name__ == "__main__":
    run_stage(main)
