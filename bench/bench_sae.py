"""Training throughput of mechdiff's TopK SAE vs SAELens's TopKTrainingSAE, sparsify's SparseCoder and
dictionary_learning's TopKTrainer on the same activations.

    .venv/bin/python bench/bench_sae.py [--seconds 10] [--repeats 3] [--mults 8 16] [--threads 2] [--no-saelens]
                                        [--no-sparsify] [--no-dictlearn]

Setup: d_in 576, k 32, batch 4096, Adam, fp32, on CPU. Each measurement runs in its own subprocess (clean
peak RSS via resource.getrusage), with one warm-up step and then as many steps as fit in --seconds. The
implementations run interleaved, --repeats rounds, so that each round compares them under similar machine
load; the final table gives medians and the per-round (side-by-side) ratios.
SAELens is never installed into the project environment: the script creates `bench/.venv-saelens`
(python3 -m venv; torch==2.13.0 first, then sae-lens==6.54.12) and runs its measurement there. If that fails
it says so and measures mechdiff alone. sparsify (EleutherAI's TopK trainer) runs likewise from
`bench/.venv-sparsify` (torch==2.13.0, then eai-sparsify==1.3.3): each step is its trainer's (decoder normalised,
forward with its fused encoder and, without triton on CPU, its eager embedding-bag decoder, FVU backward, the
decoder gradient's parallel part removed, torch Adam, the dead counter), with Adam as the optimizer as for the
others (sparsify's default is signum). dictionary_learning (the trainers behind dictionary_learning-based tools)
runs from `bench/.venv-dictlearn` (torch==2.13.0, then dictionary-learning==0.1.0): each step is one
`TopKTrainer.update` (the decoder gradient's parallel part removed, grad-norm clipping, Adam, its lr schedule, the
decoder renormalised; its AuxK term waits for latents dead over 10M tokens, so it is 0 within a run here). Activations are real rows of an activation store when --store is
given (a .npy file of shape (n, 576)), else seeded Gaussian rows with a low-rank structure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

HERE = Path(__file__).resolve().parent
VENV = HERE / ".venv-saelens"
SPARSIFY_VENV = HERE / ".venv-sparsify"
DICTLEARN_VENV = HERE / ".venv-dictlearn"
D_IN, K, BATCH = 576, 32, 4096


def _data(n_batches: int, store: str | None):
    import numpy as np

    if store:
        X = np.load(store, mmap_mode="r")
        if X.ndim != 2 or X.shape[1] != D_IN:
            raise SystemExit(f"--store must hold an (n, {D_IN}) array, got {X.shape}")
        rng = np.random.default_rng(0)
        return [np.asarray(X[rng.integers(0, X.shape[0], BATCH)], dtype=np.float32) for _ in range(n_batches)]
    rng = np.random.default_rng(0)
    mix = rng.standard_normal((64, D_IN)).astype(np.float32) / 8
    out = []
    for _ in range(n_batches):
        lat = rng.standard_normal((BATCH, 64)).astype(np.float32)
        out.append(lat @ mix + 0.3 * rng.standard_normal((BATCH, D_IN)).astype(np.float32) + 0.5)
    return out


CPU_S: list[float] = []  # process CPU seconds of the timed steps (all threads), set by _timed


def _timed(step, seconds: float) -> tuple[int, float]:
    step(0)  # warm-up
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while True:
        step(n + 1)
        n += 1
        dt = time.perf_counter() - t0
        if (dt >= seconds and n >= 2) or n >= 10_000:
            CPU_S.append(time.process_time() - c0)
            return n, dt


def sae_step(mult: int, mode: str, xs: list, dev: object = "cpu"):
    """train_sae's per-step work (forward, backward, Adam, decoder projection and normalisation, dead counter)
    on a device-resident TopK SAE; mode: sparse (fp32) | bf16 (sparse, bf16 selection) | dense (autograd)."""
    import torch

    from mechdiff.sae.model import TopKSAE

    width = D_IN * mult
    sae = TopKSAE(D_IN, width, K, seed=0).to(dev)
    sae.set_input_scale(xs[0])
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
    dead = torch.zeros(width, dtype=torch.bool, device=dev)
    since_fired = torch.zeros(width, dtype=torch.int64, device=dev)
    sparse = mode != "dense"
    sel = torch.bfloat16 if mode == "bf16" else None

    def step(i: int) -> None:
        x = xs[i % len(xs)] * sae.input_scale
        opt.zero_grad(set_to_none=True)
        loss, info = sae.training_loss(x, dead, sparse=sparse, select_dtype=sel)
        loss.backward()
        sae.project_decoder_grad_()
        opt.step()
        sae.normalize_decoder_()
        since_fired.add_(x.shape[0])
        since_fired[info["fired"]] = 0
        float(loss.detach())

    return step


def child_ours(mult: int, mode: str, seconds: float, store: str | None) -> dict:
    """mechdiff: sparse fp32 / sparse with bf16 selection / dense autograd reference."""
    import torch

    step = sae_step(mult, mode, [torch.from_numpy(b) for b in _data(4, store)])
    n, dt = _timed(step, seconds)
    return {"impl": f"mechdiff-{mode}", "mult": mult, "steps": n, "tok_s": n * BATCH / dt}


def child_saelens(mult: int, mode: str, seconds: float, store: str | None) -> dict:
    """SAELens TopKTrainingSAE forward/backward + Adam (use_sparse_activations per mode)."""
    import torch
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    batches = [torch.from_numpy(b) for b in _data(4, store)]
    width = D_IN * mult
    cfg = TopKTrainingSAEConfig(d_in=D_IN, d_sae=width, k=K, dtype="float32", device="cpu",
                                use_sparse_activations=(mode == "sparse"))
    sae = TopKTrainingSAE(cfg)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
    dead = torch.zeros(width, dtype=torch.bool)

    def step(i: int) -> None:
        opt.zero_grad(set_to_none=True)
        out = sae.training_forward_pass(TrainStepInput(sae_in=batches[i % len(batches)], coefficients={},
                                                       dead_neuron_mask=dead, n_training_steps=i,
                                                       is_logging_step=False))
        out.loss.backward()
        opt.step()

    n, dt = _timed(step, seconds)
    return {"impl": f"saelens-{mode}", "mult": mult, "steps": n, "tok_s": n * BATCH / dt}


def child_sparsify(mult: int, mode: str, seconds: float, store: str | None) -> dict:
    """sparsify's SparseCoder: one step of its Trainer (decoder normalised, forward, FVU backward, parallel gradient
    removed, Adam, dead counter), auxk_alpha 0 as in its defaults."""
    import torch
    from sparsify import SparseCoder, SparseCoderConfig

    batches = [torch.from_numpy(b) for b in _data(4, store)]
    sae = SparseCoder(D_IN, SparseCoderConfig(expansion_factor=mult, k=K))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    since_fired = torch.zeros(sae.num_latents, dtype=torch.long)

    def step(i: int) -> None:
        x = batches[i % len(batches)]
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x, dead_mask=None)
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            did_fire = torch.zeros(sae.num_latents, dtype=torch.bool)
            did_fire[out.latent_indices.flatten()] = True
            since_fired.add_(x.shape[0])
            since_fired[did_fire] = 0
        float(out.fvu.detach())

    n, dt = _timed(step, seconds)
    return {"impl": f"sparsify-{mode}", "mult": mult, "steps": n, "tok_s": n * BATCH / dt}


def child_dictlearn(mult: int, mode: str, seconds: float, store: str | None) -> dict:
    """dictionary_learning's TopKTrainer: one `update` per step (forward and loss, backward, the decoder gradient's
    parallel part removed, grad-norm clip, Adam, lr schedule, decoder renormalised; AuxK waits for latents dead
    over 10M tokens). Its first update (the untimed warm-up step) also sets the decoder bias to the batch's
    geometric median."""
    import torch
    from dictionary_learning.trainers.top_k import TopKTrainer

    batches = [torch.from_numpy(b) for b in _data(4, store)]
    trainer = TopKTrainer(steps=100_000, activation_dim=D_IN, dict_size=D_IN * mult, k=K, layer=0,
                          lm_name="bench", lr=1e-4, warmup_steps=1, seed=0, device="cpu")

    def step(i: int) -> None:
        trainer.update(i, batches[i % len(batches)])  # returns loss.item(): the step has finished

    n, dt = _timed(step, seconds)
    return {"impl": f"dictlearn-{mode}", "mult": mult, "steps": n, "tok_s": n * BATCH / dt}


def _run_child(python: str, impl: str, mult: int, mode: str, args) -> dict | None:
    cmd = [python, str(Path(__file__).resolve()), "--child", impl, "--mult", str(mult), "--mode", mode,
           "--seconds", str(args.seconds), "--threads", str(args.threads)]
    if args.store:
        cmd += ["--store", args.store]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore",
           "SPARSIFY_DISABLE_TRITON": "1"}
    return run_json_child(cmd, env, args.seconds * 20 + 300, f"{impl}-{mode} x{mult}")


def run_json_child(cmd: list[str], env: dict, timeout: float, label: str) -> dict | None:
    """Run one benchmark child process; its result is the last stdout line that is a JSON object (None, said in
    one line with the child's last error line, when it failed)."""
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    for line in r.stdout.splitlines()[::-1]:
        if line.startswith("{"):
            return json.loads(line)
    print(f"  {label} failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
    return None


TORCH = "2.13.0"  # every library is timed on the same torch (the local CPU wheel), as mechdiff is


def _ensure_venv(venv: Path, package: str, module: str, name: str) -> str | None:
    """The python of a benchmark-only venv holding `package` on torch==2.13.0 (installed first, from the local CPU
    wheel, and held there while `package` installs), created on first use; None, said in one line, when it cannot
    be installed. A torchvision that `package` pulls in is removed: the registry's build is not the CPU wheel's
    (its operators fail to load beside it) and no benchmarked trainer uses it."""
    py = venv / "bin" / "python"
    probe = f"import torch, {module}; assert torch.__version__.split('+')[0] == {TORCH!r}, torch.__version__"
    env = {**os.environ, "SPARSIFY_DISABLE_TRITON": "1"}
    if py.exists() and subprocess.run([str(py), "-c", probe], capture_output=True, env=env).returncode == 0:
        return str(py)
    print(f"creating {venv} (torch=={TORCH}, then {package}) ...", flush=True)
    try:
        if not py.exists():
            subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
        pin = venv / "torch-constraint.txt"
        pin.write_text(f"torch=={TORCH}\n")
        pip = [str(py), "-m", "pip"]
        subprocess.run([*pip, "install", "-q", f"torch=={TORCH}"], check=True)
        subprocess.run([*pip, "install", "-q", "-c", str(pin), package], check=True)
        subprocess.run([*pip, "uninstall", "-q", "-y", "torchvision"], check=True, capture_output=True)
        subprocess.run([str(py), "-c", probe], check=True, capture_output=True, env=env)
        return str(py)
    except (subprocess.CalledProcessError, OSError) as e:
        print(f"{name} could not be installed ({e}); measuring without it")
        return None


IMPL_ORDER = ["mechdiff-sparse", "mechdiff-bf16", "mechdiff-dense", "saelens-dense", "saelens-sparse",
              "sparsify-eager", "dictlearn-topk"]
OTHERS = ("saelens-dense", "saelens-sparse", "sparsify-eager", "dictlearn-topk", "mechdiff-dense")


def _table(rows: list[dict], mults: list[int]) -> None:
    """Final table: median tokens/s per implementation and width, peak RSS, and ratios of ours over SAELens."""
    print("\n=== median over repeats (tokens/s; min-max in brackets; tokens per process CPU-second, all threads; "
          "peak RSS of the child process) ===")
    print(f"{'width':>6} {'implementation':<17} {'tok/s':>8} {'[min - max]':>17} {'tok/CPU-s':>9} {'peak RSS':>9} "
          f"{'load':>5} {'ours-sparse/this':>16}")
    summary = {}
    for mult in mults:
        by: dict[str, list[dict]] = {}
        for r in rows:
            if r["mult"] == mult:
                by.setdefault(r["impl"], []).append(r)
        med = {name: median([r["tok_s"] for r in rs]) for name, rs in by.items()}
        ours = med.get("mechdiff-sparse")
        for name in [n for n in IMPL_ORDER if n in by]:
            rs = by[name]
            ts = [r["tok_s"] for r in rs]
            ratio = f"{ours / med[name]:.2f}x" if ours else "-"
            cpu = median([r.get("tok_per_cpu_s") or 0.0 for r in rs])
            print(f"{'x' + str(mult):>6} {name:<17} {med[name]:>8.0f} [{min(ts):>7.0f} - {max(ts):>7.0f}] "
                  f"{cpu:>9.0f} {max(r['peak_rss_mb'] for r in rs):>6.0f} MB {median([r['load'] for r in rs]):>5.1f} "
                  f"{ratio:>16}")
        summary[mult] = med
    print("\nside-by-side ratios per repeat (same repeat = similar machine load), median [min - max]:")
    for mult in mults:
        for ours_name in ("mechdiff-sparse", "mechdiff-bf16"):
            for other in OTHERS:
                rat = []
                for rep in sorted({r["repeat"] for r in rows}):
                    a = [r for r in rows if r["mult"] == mult and r["impl"] == ours_name and r["repeat"] == rep]
                    b = [r for r in rows if r["mult"] == mult and r["impl"] == other and r["repeat"] == rep]
                    if a and b:
                        rat.append(a[0]["tok_s"] / b[0]["tok_s"])
                if rat:
                    print(f"  x{mult:<3} {ours_name} / {other:<15} = {median(rat):.2f}x "
                          f"[{min(rat):.2f} - {max(rat):.2f}] over {len(rat)} repeats")
    print("\ntargets (issue): >= 10k tok/s at x8 and x16; >= 2x SAELens at x8, >= 3x at x16 (SAELens default = dense)")
    for mult in mults:
        med = summary[mult]
        ours, sl, sp = med.get("mechdiff-sparse"), med.get("saelens-dense"), med.get("sparsify-eager")
        dl = med.get("dictlearn-topk")
        need = 2.0 if mult <= 8 else 3.0
        if ours:
            line = f"  x{mult}: mechdiff-sparse {ours:.0f} tok/s ({'>=' if ours >= 10_000 else '<'} 10k)"
            if sl:
                line += f", {ours / sl:.2f}x SAELens-dense ({'meets' if ours / sl >= need else 'misses'} {need:.0f}x)"
            if sp:
                line += f", {ours / sp:.2f}x sparsify"
            if dl:
                line += f", {ours / dl:.2f}x dictionary_learning"
            print(line)


def main() -> None:
    """Run the benchmark (or one child measurement)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the table reports medians")
    ap.add_argument("--mults", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--store", default=None, help="optional .npy of real activations (n, 576)")
    ap.add_argument("--no-saelens", action="store_true")
    ap.add_argument("--no-sparsify", action="store_true", help="skip sparsify (EleutherAI) in bench/.venv-sparsify")
    ap.add_argument("--no-dictlearn", action="store_true",
                    help="skip dictionary_learning (its TopKTrainer) in bench/.venv-dictlearn")
    ap.add_argument("--no-dense", action="store_true", help="skip mechdiff's dense autograd reference")
    ap.add_argument("--no-bf16", action="store_true")
    ap.add_argument("--saelens-sparse", action="store_true",
                    help="also time SAELens use_sparse_activations=True (fails on CPU with sae-lens 6.54.12: "
                         "aten::view is not implemented for SparseCPU)")
    ap.add_argument("--json", default=None, help="also write all measurements to this file")
    ap.add_argument("--child", choices=["ours", "saelens", "sparsify", "dictlearn"], default=None)
    ap.add_argument("--mult", type=int, default=8)
    ap.add_argument("--mode", default="sparse")
    args = ap.parse_args()
    if not args.seconds > 0 or min(args.repeats, args.threads, args.mult, *args.mults) < 1:
        ap.error("--seconds must be > 0 and --repeats, --threads and --mults >= 1")
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        fn = {"ours": child_ours, "saelens": child_saelens, "sparsify": child_sparsify,
              "dictlearn": child_dictlearn}[args.child]
        res = fn(args.mult, args.mode, args.seconds, args.store)
        res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        res["torch"] = torch.__version__
        res["tok_per_cpu_s"] = res["steps"] * BATCH / CPU_S[-1] if CPU_S and CPU_S[-1] > 0 else None
        print(json.dumps(res))
        return
    sl_py = None if args.no_saelens else _ensure_venv(VENV, "sae-lens==6.54.12", "sae_lens", "SAELens")
    sp_py = None if args.no_sparsify else _ensure_venv(SPARSIFY_VENV, "eai-sparsify==1.3.3", "sparsify", "sparsify")
    dl_py = None if args.no_dictlearn else _ensure_venv(DICTLEARN_VENV, "dictionary-learning==0.1.0",
                                                        "dictionary_learning.trainers.top_k", "dictionary_learning")
    print(f"d_in={D_IN} k={K} batch={BATCH} Adam fp32 CPU threads={args.threads} ~{args.seconds:.0f}s each, "
          f"{args.repeats} interleaved repeats; load avg at start {os.getloadavg()[0]:.1f}", flush=True)
    jobs = [("ours", "sparse")]
    if sl_py:
        jobs += [("saelens", "dense")]
    if not args.no_bf16:
        jobs += [("ours", "bf16")]
    if sl_py and args.saelens_sparse:
        jobs += [("saelens", "sparse")]
    if sp_py:
        jobs += [("sparsify", "eager")]
    if dl_py:
        jobs += [("dictlearn", "topk")]
    if not args.no_dense:
        jobs += [("ours", "dense")]
    pythons = {"ours": sys.executable, "saelens": sl_py, "sparsify": sp_py, "dictlearn": dl_py}
    rows = []
    for rep in range(args.repeats):
        for mult in args.mults:
            for impl, mode in jobs:
                load = os.getloadavg()[0]
                r = _run_child(pythons[impl], impl, mult, mode, args)
                if r:
                    r.update(repeat=rep, load=load)
                    rows.append(r)
                    print(f"  rep {rep} x{mult:<3} {r['impl']:<17} {r['tok_s']:>8.0f} tok/s  "
                          f"{r['tok_per_cpu_s'] or 0:>7.0f} tok/CPU-s  peak RSS {r['peak_rss_mb']:.0f} MB  "
                          f"load {load:.1f}  torch {r.get('torch')}", flush=True)
    _table(rows, args.mults)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
