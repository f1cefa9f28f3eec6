"""Training throughput of mechdiff's TopK SAE vs SAELens's TopKTrainingSAE on the same activations.

    .venv/bin/python bench/bench_sae.py [--seconds 20] [--mults 8 16] [--threads 2] [--no-saelens]

Setup: d_in 576, k 32, batch 4096, Adam, fp32, on CPU. Each measurement runs in its own subprocess (clean
peak RSS via resource.getrusage), with one warm-up step and then as many steps as fit in --seconds.
SAELens is never installed into the project environment: the script creates `bench/.venv-saelens`
(python3 -m venv; torch==2.13.0 first, then sae-lens==6.54.12) and runs its measurement there. If that fails
it says so and measures mechdiff alone. Activations are real rows of an activation store when --store is
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

HERE = Path(__file__).resolve().parent
VENV = HERE / ".venv-saelens"
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


def _timed(step, seconds: float) -> tuple[int, float]:
    step(0)  # warm-up
    n, t0 = 0, time.perf_counter()
    while True:
        step(n + 1)
        n += 1
        dt = time.perf_counter() - t0
        if (dt >= seconds and n >= 2) or n >= 10_000:
            return n, dt


def child_ours(mult: int, mode: str, seconds: float, store: str | None) -> dict:
    """mechdiff: sparse fp32 / sparse with bf16 selection / dense autograd reference."""
    import torch

    from mechdiff.sae.model import TopKSAE

    batches = [torch.from_numpy(b) for b in _data(4, store)]
    width = D_IN * mult
    sae = TopKSAE(D_IN, width, K, seed=0)
    sae.set_input_scale(batches[0])
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
    dead = torch.zeros(width, dtype=torch.bool)
    sparse = mode != "dense"
    sel = torch.bfloat16 if mode == "bf16" else None

    def step(i: int) -> None:
        x = batches[i % len(batches)] * sae.input_scale
        opt.zero_grad(set_to_none=True)
        loss, _ = sae.training_loss(x, dead, sparse=sparse, select_dtype=sel)
        loss.backward()
        sae.project_decoder_grad_()
        opt.step()
        sae.normalize_decoder_()

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


def _run_child(python: str, impl: str, mult: int, mode: str, args) -> dict | None:
    cmd = [python, str(Path(__file__).resolve()), "--child", impl, "--mult", str(mult), "--mode", mode,
           "--seconds", str(args.seconds), "--threads", str(args.threads)]
    if args.store:
        cmd += ["--store", args.store]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.seconds * 20 + 300)
    for line in r.stdout.splitlines()[::-1]:
        if line.startswith("{"):
            return json.loads(line)
    print(f"  {impl}-{mode} x{mult} failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
    return None


def _ensure_saelens() -> str | None:
    py = VENV / "bin" / "python"
    ok = py.exists() and subprocess.run([str(py), "-c", "import sae_lens"], capture_output=True).returncode == 0
    if ok:
        return str(py)
    print(f"creating {VENV} (torch==2.13.0, then sae-lens==6.54.12) ...", flush=True)
    try:
        if not py.exists():
            subprocess.run(["python3", "-m", "venv", str(VENV)],
                           check=True)
        pip = [str(py), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)
        subprocess.run([*pip, "sae-lens==6.54.12"], check=True)
        subprocess.run([str(py), "-c", "import sae_lens"], check=True, capture_output=True)
        return str(py)
    except (subprocess.CalledProcessError, OSError) as e:
        print(f"SAELens could not be installed ({e}); measuring mechdiff alone")
        return None


def main() -> None:
    """Run the benchmark (or one child measurement)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--mults", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--store", default=None, help="optional .npy of real activations (n, 576)")
    ap.add_argument("--no-saelens", action="store_true")
    ap.add_argument("--no-dense", action="store_true")
    ap.add_argument("--child", choices=["ours", "saelens"], default=None)
    ap.add_argument("--mult", type=int, default=8)
    ap.add_argument("--mode", default="sparse")
    args = ap.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        fn = child_ours if args.child == "ours" else child_saelens
        res = fn(args.mult, args.mode, args.seconds, args.store)
        res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(res))
        return
    sl_py = None if args.no_saelens else _ensure_saelens()
    print(f"d_in={D_IN} k={K} batch={BATCH} Adam fp32 CPU threads={args.threads} ~{args.seconds:.0f}s each; "
          f"load avg {os.getloadavg()[0]:.1f}")
    rows = []
    for mult in args.mults:
        modes = ["sparse", "bf16"] + ([] if args.no_dense else ["dense"])
        for mode in modes:
            r = _run_child(sys.executable, "ours", mult, mode, args)
            if r:
                rows.append(r)
                print(f"  x{mult:<3} {r['impl']:<18} {r['tok_s']:>9.0f} tok/s  peak RSS {r['peak_rss_mb']:.0f} MB",
                      flush=True)
        if sl_py:
            for mode in ("dense", "sparse"):
                r = _run_child(sl_py, "saelens", mult, mode, args)
                if r:
                    rows.append(r)
                    print(f"  x{mult:<3} {r['impl']:<18} {r['tok_s']:>9.0f} tok/s  peak RSS "
                          f"{r['peak_rss_mb']:.0f} MB", flush=True)
    print("\nratios (tokens/s of mechdiff-sparse over the others):")
    for mult in args.mults:
        by = {r["impl"]: r for r in rows if r["mult"] == mult}
        ours = by.get("mechdiff-sparse")
        if not ours:
            continue
        for name, r in by.items():
            if name != "mechdiff-sparse":
                print(f"  x{mult}: mechdiff-sparse / {name} = {ours['tok_s'] / r['tok_s']:.2f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
