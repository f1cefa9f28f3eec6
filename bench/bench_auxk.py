"""AuxK kernels: one TopK SAE training step with the AuxK term as sparse (row, latent) pairs or dense over the
dead columns, for a range of dead-latent counts (the measurement behind `mechdiff.sae.model.AUX_DENSE_FILL`).

    .venv/bin/python bench/bench_auxk.py                # d 576 (an SAE) and 1152 (a crosscoder), B 1024
    .venv/bin/python bench/bench_auxk.py --dims 576 --dead 100 1000

Prints, per input width and dead count, the best-of-N step time (forward + backward of the loss) of each path,
their ratio, and which path the default rule picks.
"""

from __future__ import annotations

import argparse
import time

import torch

import mechdiff.sae.model as sae_model
from mechdiff.data.extract import set_threads


def step_ms(sae: sae_model.TopKSAE, x: torch.Tensor, dead: torch.Tensor, fill: float, repeats: int) -> float:
    """Best time (ms) of `repeats` training-loss forward + backward passes with AUX_DENSE_FILL = fill."""
    keep = sae_model.AUX_DENSE_FILL
    sae_model.AUX_DENSE_FILL = fill
    try:
        best = float("inf")
        for i in range(repeats + 1):
            sae.zero_grad(set_to_none=True)
            t = time.perf_counter()
            loss, _ = sae.training_loss(x, dead)
            loss.backward()
            if i:  # the first pass warms the kernels up
                best = min(best, time.perf_counter() - t)
        return 1e3 * best
    finally:
        sae_model.AUX_DENSE_FILL = keep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", type=int, nargs="+", default=[576, 1152], help="input widths (1152 = a crosscoder)")
    ap.add_argument("--width", type=int, default=4608)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--k-aux", type=int, default=288)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--dead", type=int, nargs="+", default=[14, 150, 288, 576, 1152, 2304])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if min(args.k, args.k_aux, args.batch, args.repeats, args.threads, *args.dims) < 1 or args.width < args.k:
        ap.error("--k, --k-aux, --batch, --repeats, --threads and --dims must be >= 1, and --width >= --k")
    if any(not 0 <= d <= args.width for d in args.dead):
        ap.error(f"--dead counts latents: each in 0..--width ({args.width}), got {args.dead}")
    set_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    print(f"B {args.batch}, width {args.width}, k {args.k}, k_aux {args.k_aux}, {torch.get_num_threads()} threads; "
          f"default rule: dense when n_dead <= {sae_model.AUX_DENSE_FILL} x k_aux")
    print(f"{'d':>5} {'n_dead':>7} {'pairs ms':>9} {'dense ms':>9} {'pairs/dense':>12}  default")
    for d in args.dims:
        blocks = 2 if d % 2 == 0 and d > 576 else 1
        sae = sae_model.TopKSAE(d // blocks, args.width, args.k, k_aux=args.k_aux, n_blocks=blocks, seed=0)
        x = torch.randn(args.batch, d, generator=gen)
        for n_dead in args.dead:
            dead = torch.zeros(args.width, dtype=torch.bool)
            dead[torch.randperm(args.width, generator=gen)[:n_dead]] = True
            pairs = step_ms(sae, x, dead, 0, args.repeats)
            dense = step_ms(sae, x, dead, float("inf"), args.repeats)
            pick = "dense" if n_dead <= sae_model.AUX_DENSE_FILL * min(args.k_aux, n_dead) else "pairs"
            print(f"{d:>5} {n_dead:>7} {pairs:>9.1f} {dense:>9.1f} {pairs / dense:>11.2f}x  {pick}")


if __name__ == "__main__":
    from mechdiff.errors import exit_on_error

    exit_on_error(main, "bench_auxk.py")
