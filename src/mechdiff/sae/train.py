"""Streaming trainer for `TopKSAE`: Adam, AuxK, dead-latent statistics, atomic checkpoints and resume.

The trainer consumes any iterable of (B, d_in * n_blocks) arrays (numpy or torch): one model's activations,
a delta view (tuned - base) or concatenated [base, tuned] rows for a crosscoder. The first batch sets the
input scale (unless given) and b_pre (its mean), then is trained on like every other batch.

Dead latents: a running counter of tokens since each latent last fired; a latent is dead once the counter
reaches `dead_tokens` (default min(10M, total_tokens / 10), at least one batch).

Checkpoints (every `ckpt_every` steps, and once `ckpt_seconds` of training passed since the last one) go to
`out_dir/checkpoints/step-<n>/` (SAE + optimizer state + dead counter + RNG state + log so far) and
`out_dir/checkpoints/latest.json` points at the newest complete one (written last, by an atomic rename). On resume the trainer reloads it and skips the `step` batches that were
already consumed: the caller's iterator must be deterministic (same seed, same order).

Stopping: the run trains on at most `total_tokens` (the budget). With a held-out matrix `val` (rows never
trained on) the held-out FVU is measured every `eval_every` steps; once it improved by less than
`plateau_tol` (relative) over the last `patience` evaluations the run has plateaued, and it then decays the
learning rate linearly to 0 over a cool-down of `decay_frac` x the steps so far and stops (warmup-stable-decay:
the schedule is constant until the stop is known). The plateau state is in every checkpoint, so a resumed
run stops where an uninterrupted one does.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from mechdiff.errors import UNREADABLE, MechdiffError, why
from mechdiff.io import to_jsonable
from mechdiff.sae.model import TopKSAE, save_sae


@dataclass
class SAEConfig:
    """Architecture and optimisation settings of one SAE / crosscoder run."""

    d_in: int
    width: int
    k: int
    batch_size: int  # no default: the caller chooses it (the pipeline passes params sae.batch_size)
    k_aux: int | None = None  # default d_in // 2
    lr: float | None = None  # default 1e-3 * sqrt(2^14 / width), capped at 1e-2 (measured: planted dictionaries)
    batchtopk: bool = False
    n_blocks: int = 1
    dead_tokens: int | None = None  # default min(10M, total_tokens // 10)
    seed: int = 0
    aux_coef: float = 1 / 32
    warmup_frac: float = 0.02  # linear lr warm-up over this share of steps
    decay_frac: float = 0.2  # linear lr decay to 0 over the last share of steps
    beta1: float = 0.9
    beta2: float = 0.999
    resample_every: int = 0  # steps between dead-latent resamplings; 0 = off (AuxK only)
    ckpt_every: int = 500
    ckpt_seconds: float = 60.0  # also checkpoint once this much wall time passed since the last (0 = steps only): a
    #                             kill loses at most about this much (checkpoints never change what is trained)
    sparse: bool = True  # sparse decoder + sparse encoder backward (False: dense autograd reference)
    bf16: bool = False  # select the active latents with a bf16 encoder matmul (values and grads stay fp32)
    input_scale: float | None = None  # default: estimated from the first batch
    block_scale: bool = False  # crosscoder: one input scale per model (block) instead of one for the concatenation
    threshold_decay: float = 0.99  # BatchTopK: EMA of the smallest kept activation
    eval_every: int = 50  # steps between held-out FVU evaluations (only with train_sae(val=...))
    plateau_tol: float = 0.01  # plateau: held-out FVU improved by less than this share over the window
    patience: int = 4  # the window: this many evaluations (patience x eval_every steps)
    meta: dict = field(default_factory=dict)  # hook site, source, model id ... (written to cfg.json)

    def validate(self) -> None:
        """Raise MechdiffError on an inconsistent config."""
        for name in ("d_in", "width", "k", "batch_size", "n_blocks"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise MechdiffError(f"SAEConfig.{name} must be a positive int, got {v!r}")
        if self.k > self.width:
            raise MechdiffError(f"SAEConfig.k={self.k} exceeds width={self.width}")
        if self.k_aux is not None and (not isinstance(self.k_aux, int) or isinstance(self.k_aux, bool)
                                       or self.k_aux < 1):
            raise MechdiffError(f"SAEConfig.k_aux must be a positive int or None, got {self.k_aux!r}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise MechdiffError(f"SAEConfig.lr must be a positive number, got {self.lr!r}")
        if not 0 <= self.warmup_frac < 1 or not 0 <= self.decay_frac <= 1:
            raise MechdiffError("SAEConfig.warmup_frac and decay_frac must lie in [0, 1)")
        if self.aux_coef < 0:
            raise MechdiffError(f"SAEConfig.aux_coef must be >= 0, got {self.aux_coef}")
        for name in ("eval_every", "patience"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise MechdiffError(f"SAEConfig.{name} must be a positive int, got {v!r}")
        if not isinstance(self.ckpt_every, int) or isinstance(self.ckpt_every, bool) or self.ckpt_every < 0:
            raise MechdiffError(f"SAEConfig.ckpt_every must be an int >= 0 (0: no step checkpoints), got "
                                f"{self.ckpt_every!r}")
        if (not isinstance(self.ckpt_seconds, int | float) or isinstance(self.ckpt_seconds, bool)
                or not math.isfinite(self.ckpt_seconds) or self.ckpt_seconds < 0):
            raise MechdiffError(f"SAEConfig.ckpt_seconds must be a finite number >= 0 (0: no timed checkpoints), "
                                f"got {self.ckpt_seconds!r}")
        if not (0 <= self.plateau_tol < 1):
            raise MechdiffError(f"SAEConfig.plateau_tol must lie in [0, 1), got {self.plateau_tol!r}")

    def resolved_lr(self) -> float:
        """The learning rate actually used."""
        return float(self.lr) if self.lr is not None else min(1e-2, 1e-3 * math.sqrt(2 ** 14 / self.width))


def _warmup_steps(total: int, warmup_frac: float) -> int:
    return max(1, int(round(warmup_frac * total)))


def _decay_start(total: int, decay_frac: float) -> int:
    return total - int(round(decay_frac * total))


def _lr_factor(step: int, total: int, warmup_frac: float, decay_frac: float,
               cooldown: tuple[int, int] | None = None) -> float:
    """Learning-rate multiplier at `step` (0-based) of a `total`-step budget: linear warm-up, constant, linear decay
    to 0 over the last `decay_frac` of the budget; or, after a plateau, `cooldown` = (from, end): linear decay from
    the factor at `from` to 0 at `end` instead."""
    f = min(1.0, (step + 1) / _warmup_steps(total, warmup_frac))
    if cooldown is not None:
        start, end = cooldown
        f0 = min(1.0, (start + 1) / _warmup_steps(total, warmup_frac))
        return f0 * max(0.0, (end - step) / max(1, end - start))
    dec_start = _decay_start(total, decay_frac)
    if decay_frac > 0 and step >= dec_start:
        f *= max(0.0, (total - step) / max(1, total - dec_start))
    return f


def _plateaued(hist: list[float], tol: float, patience: int) -> bool:
    """Did the held-out FVU improve by less than `tol` (relative) over the last `patience` evaluations?"""
    if len(hist) <= patience:
        return False
    ref, cur = hist[-1 - patience], hist[-1]
    return (ref - cur) < tol * max(abs(ref), 1e-12)


@torch.no_grad()
def held_out_fvu(sae: torch.nn.Module, val: torch.Tensor, *, chunk: int = 4096) -> float:
    """FVU of the SAE's reconstruction of raw rows `val` (n, d): sum ||x - x_hat||^2 / sum ||x - mean(x)||^2."""
    mean = val.double().mean(0)
    err = tot = 0.0
    for s in range(0, val.shape[0], chunk):
        x = val[s : s + chunk]
        err += float(((x - sae(x)).double() ** 2).sum())
        tot += float(((x.double() - mean) ** 2).sum())
    return err / max(tot, 1e-30)


def _make_optimizer(sae: TopKSAE, cfg: SAEConfig) -> torch.optim.Optimizer:
    kw = dict(lr=cfg.resolved_lr(), betas=(cfg.beta1, cfg.beta2))
    try:
        return torch.optim.Adam(sae.parameters(), fused=True, **kw)
    except (RuntimeError, TypeError):  # fused kernels unavailable for this device/dtype
        return torch.optim.Adam(sae.parameters(), foreach=True, **kw)


def _to_tensor(batch: object, d: int) -> torch.Tensor:
    if isinstance(batch, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
    elif isinstance(batch, torch.Tensor):
        x = batch.detach().to(torch.float32)
    else:
        raise MechdiffError(f"SAE batches must be numpy arrays or torch tensors, got {type(batch).__name__}")
    if x.dim() != 2 or x.shape[1] != d or x.shape[0] == 0:
        raise MechdiffError(f"SAE batch has shape {tuple(x.shape)}, expected (B > 0, {d}): check d_in / n_blocks")
    if not bool(torch.isfinite(x).all()):
        raise MechdiffError("an SAE batch contains NaN or inf: check the activation store")
    return x


class _State:
    """Mutable training state saved with each checkpoint."""

    def __init__(self, width: int, seed: int) -> None:
        self.step = 0
        self.tokens = 0
        self.since_fired = torch.zeros(width, dtype=torch.int64)
        self.gen = torch.Generator().manual_seed(int(seed) + 1)
        self.log: list[dict] = []
        self.val_hist: list[float] = []  # held-out FVU at each evaluation
        self.cooldown: tuple[int, int] | None = None  # (plateau step, stop step) once a plateau is found


def _ckpt_root(out_dir: Path) -> Path:
    return out_dir / "checkpoints"


def _save(sae: torch.nn.Module, out: Path, meta: dict | None = None) -> None:
    """The final checkpoint format of the SAE's kind (`save_sae` for TopK SAEs, the model's own `save` else)."""
    if isinstance(sae, TopKSAE):
        save_sae(sae, out, meta=meta)
    else:
        sae.save(out, meta=meta)


def _save_checkpoint(out_dir: Path, sae: torch.nn.Module, opt: torch.optim.Optimizer, st: _State,
                     cfg: SAEConfig) -> None:
    from safetensors.torch import save_file

    root = _ckpt_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{st.step:09d}"
    tmp = root / f".tmp-{name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in sae.state_dict().items()}, str(tmp / "model.safetensors"))
    torch.save(opt.state_dict(), tmp / "optim.pt")
    save_file({"since_fired": st.since_fired.cpu(), "rng": st.gen.get_state()}, str(tmp / "train_state.safetensors"))
    (tmp / "state.json").write_text(json.dumps(to_jsonable({"step": st.step, "tokens": st.tokens, "log": st.log,
                                                            "val_hist": st.val_hist, "cooldown": st.cooldown,
                                                            "cfg": asdict(cfg)})))
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    ptr = root / ".latest.json.tmp"
    ptr.write_text(json.dumps({"dir": name, "step": st.step}))
    os.replace(ptr, root / "latest.json")
    for old in root.iterdir():
        if old.is_dir() and old.name != name:
            shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(out_dir: Path, cfg: SAEConfig, sae: torch.nn.Module) -> tuple[dict, _State] | None:
    """Load the newest checkpoint's weights into `sae` (a fresh model of the same kind); (optimizer state, state).

    A damaged checkpoint (a truncated or missing file: a disk fault, a full disk; a kill cannot do it, checkpoints
    are renamed into place) is a one-line error that says to delete it, as the fine-tune's is."""
    root = _ckpt_root(out_dir)
    if not (root / "latest.json").is_file():
        return None
    try:
        return _read_checkpoint(root, cfg, sae)
    except UNREADABLE as e:
        raise MechdiffError(f"SAE checkpoint in {root} is unreadable ({why(e)}): delete {root} to train this SAE "
                            "from scratch") from e


def _read_checkpoint(root: Path, cfg: SAEConfig, sae: torch.nn.Module) -> tuple[dict, _State]:
    from safetensors.torch import load_file

    ptr = root / "latest.json"
    d = root / json.loads(ptr.read_text())["dir"]
    state = json.loads((d / "state.json").read_text())
    saved = state["cfg"]
    for key in ("d_in", "width", "k", "n_blocks", "batchtopk", "batch_size", "seed"):
        if saved.get(key) != getattr(cfg, key):
            raise MechdiffError(
                f"checkpoint in {root} was made with {key}={saved.get(key)!r}, not {getattr(cfg, key)!r}: "
                f"delete {root} or train with resume=False"
            )
    for key in ("eval_every", "plateau_tol", "patience", "warmup_frac", "decay_frac", "block_scale"):
        if key in saved and saved[key] != getattr(cfg, key):
            raise MechdiffError(f"checkpoint in {root} was made with {key}={saved[key]!r}, not {getattr(cfg, key)!r}: "
                                f"delete {root} or train with resume=False")
    if not (d / "model.safetensors").is_file():
        raise MechdiffError(f"checkpoint {d} was written by an older mechdiff (no model.safetensors): delete {root} "
                            "to train from scratch")
    try:
        tensors = load_file(str(d / "model.safetensors"))
        if "input_scale" in tensors:  # a per-block scale is a vector: the fresh SAE's buffer is a scalar until set
            sae.set_scale(tensors["input_scale"].tolist())
        sae.load_state_dict(tensors)
    except RuntimeError as e:
        raise MechdiffError(f"checkpoint {d} does not fit the model to train ({str(e).splitlines()[0][:120]}): "
                            f"delete {root} or train with resume=False") from e
    ts = load_file(str(d / "train_state.safetensors"))
    st = _State(cfg.width, cfg.seed)
    st.step, st.tokens, st.log = int(state["step"]), int(state["tokens"]), list(state["log"])
    st.val_hist = [float(v) for v in state.get("val_hist", [])]
    st.cooldown = tuple(state["cooldown"]) if state.get("cooldown") is not None else None
    st.since_fired = ts["since_fired"].to(torch.int64).clone()
    st.gen.set_state(ts["rng"])
    opt_state = torch.load(d / "optim.pt", weights_only=True)
    return opt_state, st


def _reset_adam_rows(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], idx: torch.Tensor) -> None:
    for p in params:
        s = opt.state.get(p)
        if not s:
            continue
        for key in ("exp_avg", "exp_avg_sq"):
            if key in s:
                s[key][idx] = 0.0


def _all_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of `t` over the ranks of the process group (a new tensor)."""
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _sum_grads(model: torch.nn.Module) -> None:
    """Sum every parameter's gradient over the ranks, in one flat all-reduce."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    i = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[i : i + n].view_as(p).clone()
        i += n


def train_sae(batches: Iterable[np.ndarray | torch.Tensor], cfg: SAEConfig, out_dir: Path | str | None, *,
              total_tokens: int, resume: bool = True, progress: bool = True, log_every: int = 50,
              on_log: Callable[[dict], None] | None = None, keep_checkpoints: bool = False,
              model: torch.nn.Module | None = None, device: str | torch.device | None = None,
              ddp: bool = False, val: np.ndarray | torch.Tensor | None = None) -> TopKSAE:
    """Train a TopK SAE / crosscoder on a stream of (B, d_in * n_blocks) batches; save it to `out_dir`.

    `model` trains another SAE kind in this same loop (e.g. a `HierarchicalSAE`, already initialised; its
    width must equal cfg.width): it provides set_input_scale, scale, set_scale, b_pre, input_scale, training_loss,
    project_decoder_grad_, normalize_decoder_, release_workspace and save.

    `device` (e.g. 'cuda') moves the SAE there first; batches and training state always follow the SAE's device.

    `ddp` (inside a torch.distributed process group, e.g. under torchrun): data-parallel training of one SAE.
    Every rank reads the same stream of global batches and computes on its own contiguous share of each batch's
    rows; gradients are summed across ranks after backward (the algorithm of torch's DistributedDataParallel,
    done on one flat buffer), so the update equals one process's on the global batch up to float summation
    order, and every rank runs the same number of steps (no rank can run out of batches first). Rank 0
    writes checkpoints, the log and the final SAE; every rank resumes from the same checkpoint.
    `val` (n, d_in * n_blocks; rows never trained on): the held-out FVU is measured every `cfg.eval_every` steps
    (logged as `val_fvu`) and the run stops early on a plateau (module docstring: `cfg.plateau_tol` over
    `cfg.patience` evaluations, then a linear learning-rate cool-down of `cfg.decay_frac` x the steps so far).
    Without `val` the run is the plain budget schedule.
    Stops after ceil(total_tokens / batch_size) steps (the budget), at the end of a plateau's cool-down, or when the
    stream ends; why is `sae.stop_reason` (also in the saved meta). The returned SAE carries the training curve as
    `sae.train_log` (list of dicts: step, tokens, loss, fvu, l0, aux, dead_pct, lr, and val_fvu with `val`), also
    written to `out_dir/train_log.json`. Checkpoints are removed at the end unless `keep_checkpoints`.
    """
    cfg.validate()
    rank, world = 0, 1
    if ddp:
        if not (dist.is_available() and dist.is_initialized()):
            raise MechdiffError("ddp=True needs a torch.distributed process group: run under torchrun "
                                "(mechdiff.dist.init joins it)")
        rank, world = dist.get_rank(), dist.get_world_size()
        if model is not None or cfg.batchtopk:
            raise MechdiffError("data-parallel SAE training supports TopK SAEs only (batchtopk: false, no model=)")
    if not isinstance(total_tokens, int) or total_tokens < 1:
        raise MechdiffError(f"total_tokens must be a positive int, got {total_tokens!r}")
    out = Path(out_dir) if out_dir is not None and rank == 0 else None  # rank 0 writes
    load_from = Path(out_dir) if out_dir is not None else None
    D = cfg.d_in * cfg.n_blocks
    total_steps = max(1, math.ceil(total_tokens / cfg.batch_size))
    dead_tokens = cfg.dead_tokens if cfg.dead_tokens is not None else min(10_000_000, max(cfg.batch_size,
                                                                                         total_tokens // 10))
    if model is None:
        sae = TopKSAE(cfg.d_in, cfg.width, cfg.k, k_aux=cfg.k_aux, batchtopk=cfg.batchtopk,
                      n_blocks=cfg.n_blocks, seed=cfg.seed)
    elif getattr(model, "width", None) != cfg.width:
        raise MechdiffError(f"the model to train has width {getattr(model, 'width', None)}, cfg.width {cfg.width}")
    else:
        sae = model
    if device is not None:
        sae.to(device)
    opt = _make_optimizer(sae, cfg)
    loaded = _load_checkpoint(load_from, cfg, sae) if (load_from is not None and resume) else None
    if loaded is not None:
        opt_state, st = loaded
        opt.load_state_dict(opt_state)
    else:
        st = _State(cfg.width, cfg.seed)
    sae.meta.update(cfg.meta)
    dev = next(sae.parameters()).device  # batches and the dead-latent counter follow the model
    st.since_fired = st.since_fired.to(dev)
    sae.train()
    val_t = _to_tensor(val, D).to(dev) if val is not None else None
    if val_t is not None and val_t.shape[0] < 2:
        raise MechdiffError("the held-out rows for the plateau check need at least 2 rows: hold out more prompts")

    def evaluate() -> float:
        v = torch.tensor([held_out_fvu(sae, val_t) if rank == 0 else 0.0], dtype=torch.float64, device=dev)
        if world > 1:  # rank 0's value, so every rank takes the same stopping decision
            dist.broadcast(v, src=0)
        return float(v[0])

    base_lr = cfg.resolved_lr()
    select_dtype = torch.bfloat16 if cfg.bf16 else None
    it = iter(batches)
    if st.step:
        for _ in itertools.islice(it, st.step):
            pass
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=st.step, desc="sae", unit="step", leave=False)
    last_info: dict = {}
    last_ckpt = time.monotonic()
    try:
        while st.step < (st.cooldown[1] if st.cooldown is not None else total_steps):
            try:
                batch = next(it)
            except StopIteration:
                break
            x = _to_tensor(batch, D).to(dev, non_blocking=True)
            if st.step == 0:
                with torch.no_grad():
                    if cfg.input_scale is not None:
                        if not cfg.input_scale > 0:
                            raise MechdiffError(f"SAEConfig.input_scale must be > 0, got {cfg.input_scale}")
                        sae.set_scale(float(cfg.input_scale))
                    elif cfg.block_scale:  # one scale per block: a crosscoder (per_model)
                        sae.set_input_scale(x, per_block=True)
                    else:
                        sae.set_input_scale(x)
                    sae.b_pre.copy_((x * sae.scale()).mean(0))
            x_n = x * sae.scale()
            for g in opt.param_groups:
                g["lr"] = base_lr * _lr_factor(st.step, total_steps, cfg.warmup_frac, cfg.decay_frac, st.cooldown)
            dead = st.since_fired >= dead_tokens
            opt.zero_grad(set_to_none=True)
            if world > 1:
                a, b = x_n.shape[0] * rank // world, x_n.shape[0] * (rank + 1) // world
                loss, info = sae.training_loss(
                    x_n[a:b], dead, aux_coef=cfg.aux_coef, sparse=cfg.sparse, select_dtype=select_dtype,
                    denom=(x_n.var(0, correction=0).sum() * x_n.shape[0]).clamp_min(1e-12), reduce=_all_sum)
                loss.backward()
                _sum_grads(sae)
            else:
                loss, info = sae.training_loss(x_n, dead, aux_coef=cfg.aux_coef, sparse=cfg.sparse,
                                               select_dtype=select_dtype)
                loss.backward()
            sae.project_decoder_grad_()
            opt.step()
            sae.normalize_decoder_()
            B = x.shape[0]
            st.since_fired += B
            st.since_fired[info["fired"]] = 0
            if cfg.batchtopk and "min_kept" in info:
                with torch.no_grad():
                    if not bool(sae.threshold_set):
                        sae.threshold.fill_(info["min_kept"])
                        sae.threshold_set.fill_(True)
                    else:
                        sae.threshold.mul_(cfg.threshold_decay).add_((1 - cfg.threshold_decay) * info["min_kept"])
            if (cfg.resample_every and hasattr(sae, "resample_dead_") and (st.step + 1) % cfg.resample_every == 0
                    and bool(dead.any())):
                idx = sae.resample_dead_(x_n, dead, generator=st.gen)
                _reset_adam_rows(opt, [sae.W_enc, sae.dec, sae.b_enc], idx)
                st.since_fired[idx] = 0
            st.step += 1
            st.tokens += B
            last_info = {"loss": float(_all_sum(loss.detach()) if world > 1 else loss.detach()), "fvu": info["fvu"],
                         "l0": info["l0"], "aux": info["aux"]}
            end = st.cooldown[1] if st.cooldown is not None else total_steps
            val_fvu = None
            if val_t is not None and (st.step % cfg.eval_every == 0 or st.step == end):
                val_fvu = evaluate()
                if st.step % cfg.eval_every == 0:
                    st.val_hist.append(val_fvu)
                    if (st.cooldown is None and st.step >= _warmup_steps(total_steps, cfg.warmup_frac)
                            and st.step < _decay_start(total_steps, cfg.decay_frac)
                            and _plateaued(st.val_hist, cfg.plateau_tol, cfg.patience)):
                        st.cooldown = (st.step, min(total_steps, st.step + max(1, round(cfg.decay_frac * st.step))))
                        end = st.cooldown[1]
            if st.step % log_every == 0 or st.step == end or val_fvu is not None:
                rec = {"step": st.step, "tokens": st.tokens, **last_info,
                       "dead_pct": 100.0 * float((st.since_fired >= dead_tokens).float().mean()),
                       "lr": opt.param_groups[0]["lr"]}
                if val_t is not None:
                    rec["val_fvu"] = val_fvu
                st.log.append(rec)
                if on_log is not None:
                    on_log(rec)
                if bar is not None:
                    bar.set_postfix(fvu=f"{rec['fvu']:.3f}", l0=f"{rec['l0']:.1f}", dead=f"{rec['dead_pct']:.1f}%")
            if bar is not None:
                bar.update(1)
            if out is not None and st.step < end and (
                    (cfg.ckpt_every and st.step % cfg.ckpt_every == 0)
                    or (cfg.ckpt_seconds and time.monotonic() - last_ckpt >= cfg.ckpt_seconds)):
                _save_checkpoint(out, sae, opt, st, cfg)
                last_ckpt = time.monotonic()
    finally:
        if bar is not None:
            bar.close()
    if st.step == 0:
        raise MechdiffError("the SAE got no training batches: the activation store or split is empty")
    if not st.log or st.log[-1]["step"] != st.step:
        rec = {"step": st.step, "tokens": st.tokens, **last_info,
               "dead_pct": 100.0 * float((st.since_fired >= dead_tokens).float().mean()),
               "lr": opt.param_groups[0]["lr"]}
        if val_t is not None:
            rec["val_fvu"] = evaluate()
        st.log.append(rec)
    if st.cooldown is not None:
        stop = f"plateau at step {st.cooldown[0]}, cool-down to step {st.cooldown[1]}"
    elif st.step >= total_steps:
        stop = f"token budget ({total_steps} steps)"
    else:
        stop = f"stream ended at step {st.step}"
    final_val = st.log[-1].get("val_fvu") if val_t is not None else None
    sae.release_workspace()
    sae.eval()
    sae.train_log = st.log
    sae.dead_tokens = dead_tokens
    sae.stop_reason = stop
    if out is not None:
        meta = {"train_steps": st.step, "train_tokens": st.tokens, "dead_tokens": dead_tokens, "stop_reason": stop,
                "plateau_step": st.cooldown[0] if st.cooldown is not None else None, "val_fvu": final_val}
        _save(sae, out, meta=meta)
        tmp = out / ".train_log.json.tmp"
        tmp.write_text(json.dumps(to_jsonable(st.log)))
        os.replace(tmp, out / "train_log.json")
        if not keep_checkpoints:
            shutil.rmtree(_ckpt_root(out), ignore_errors=True)
    return sae
