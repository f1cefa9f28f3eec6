"""Run by torchrun from tests/dist: one rank of a data-parallel extraction or SAE training on a tiny setup.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist/_worker.py extract OUT [--crash-rank R]
    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist/_worker.py ddp OUT STORE
    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist/_worker.py many OUT STORE

Everything is built from fixed seeds, so the single-process reference in the tests builds the same thing.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from mechdiff.data.corpus import Prompt as P

WORDS = "the cat sat on a mat while dogs ran far from home under grey skies and quiet rain".split()
VIEWS = {"L0.resid_post": ["last", "mean", "tokens"], "L2.resid_post": ["last", "mean"], "L1.mlp_out": ["mean"],
         "L3.resid_pre": ["last", "tokens"]}
SHARD_ROWS = 8




def setup():
    """(model, tokenizer, prompts): 37 prompts of 2-14 words, a 4-layer width-32 tiny Llama."""
    from mechdiff.model.tiny import make_tiny_model, make_tiny_tokenizer

    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 14)))) for _ in range(37)]
    tok = make_tiny_tokenizer(texts)
    model = make_tiny_model(len(tok), n_layers=4, d_model=32, seed=1)
    prompts = [P(100 + 3 * i, t, ["cultural", "control"][i % 2], ["train", "test"][i % 3 == 0])
               for i, t in enumerate(texts)]
    return model, tok, prompts


def run_extract(out: str, threads: int = 1, n_prompts: int | None = None) -> None:
    from mechdiff.data.extract import extract

    model, tok, prompts = setup()
    prompts = prompts[:n_prompts]
    extract(model, tok, prompts, list(VIEWS), VIEWS, out, batch_size=3, shard_rows=SHARD_ROWS, store_logits=True,
            progress=False, threads=threads)


D_IN, WIDTH, K, BATCH, STEPS = 24, 256, 3, 64, 40


def sae_batches(seed: int = 0) -> list[np.ndarray]:
    """STEPS batches of sparse codes over a planted dictionary plus noise (the same for every caller)."""
    rng = np.random.default_rng(seed)
    atoms = rng.normal(size=(48, D_IN))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    out = []
    for _ in range(STEPS):
        codes = rng.exponential(size=(BATCH, 48)) * (rng.random((BATCH, 48)) < 0.08)
        out.append((codes @ atoms + 0.05 * rng.normal(size=(BATCH, D_IN))).astype(np.float32))
    return out


def sae_config(seed: int = 0, ckpt_every: int = 500):
    from mechdiff.sae import SAEConfig

    return SAEConfig(d_in=D_IN, width=WIDTH, k=K, batch_size=BATCH, seed=seed, ckpt_every=ckpt_every, ckpt_seconds=0,
                     dead_tokens=128, lr=3e-3)


def run_sae(out: str, *, seed: int = 0, ddp: bool = False, ckpt_every: int = 500) -> None:
    from mechdiff.sae import train_sae

    train_sae(sae_batches(seed), sae_config(seed, ckpt_every), out, total_tokens=BATCH * STEPS, progress=False,
              ddp=ddp, keep_checkpoints=False)


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["extract", "extract-small", "ddp", "many"])
    ap.add_argument("out")
    ap.add_argument("--crash-rank", type=int, default=-1, help="this rank dies after its first commit")
    ap.add_argument("--crash-step", type=int, default=-1, help="ddp: every rank dies after this training step")
    a = ap.parse_args(argv)
    from mechdiff import dist
    from mechdiff.data import store as st

    rank, _ = dist.init()
    if rank == a.crash_rank:
        orig = st.StoreWriter._commit_state

        def dying(self, *args, **kw):
            orig(self, *args, **kw)
            raise SystemExit(f"rank {rank}: killed after a commit")

        st.StoreWriter._commit_state = dying
    if a.mode == "extract":
        run_extract(a.out)
    elif a.mode == "extract-small":
        run_extract(a.out, n_prompts=7)
    elif a.mode == "ddp":
        if a.crash_step >= 0:
            import mechdiff.sae.train as tr

            orig_save = tr._save_checkpoint

            def save_then_die(out_dir, sae, opt, state, cfg):
                orig_save(out_dir, sae, opt, state, cfg)
                if state.step >= a.crash_step:
                    raise SystemExit(f"killed after step {state.step}")

            tr._save_checkpoint = save_then_die
            # rank 0 saves; the other ranks die at the same step through the next collective's failure
        run_sae(a.out, ddp=True, ckpt_every=10)
    elif a.mode == "many":
        for seed in dist.my_share([0, 1, 2]):
            run_sae(f"{a.out}/sae{seed}", seed=seed)
    dist.close()


if __name__ == "__main__":
    main(sys.argv[1:])
