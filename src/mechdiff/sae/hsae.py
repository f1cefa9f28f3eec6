"""Hierarchical SAE (Muchane et al. 2025, arXiv 2506.01197): TopK parent latents, each with a small child SAE whose
top-1 child fires only together with its parent; random or teacher initialisation; concept metrics.

Inputs are normalised like `TopKSAE` (x_n = input_scale * x, b_pre subtracted before the encoders):

    a = TopK_k(ReLU(W_p (x_n - b_pre) + b_p))                         parents (P latents, k active)
    for each active parent p:  j* = argmax_j (W_c[p, j] (x_n - b_pre) + b_c[p, j])
                               b_p = ReLU(that pre-activation)         its one active child (C per parent)
    x_hat_n = b_pre + sum_p a_p D_p[p] + sum_p b_p D_c[p, j*]

Training uses the project's one SAE loop (`train_sae(..., model=HierarchicalSAE(...))`). The loss is the batch
FVU plus `ortho_coef` * mean cos_M(D_p[p], D_c[p, j])^2, the causal orthogonality penalty (M the causal inner
product on the site): it keeps each child atom orthogonal to its parent, which makes the split of a row between
parent and child identifiable (without it a child atom may carry any part of its parent's direction). The
teacher schedule (`freeze_steps`): for the first steps the teacher parents' decoder atoms stay frozen.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mechdiff.errors import MechdiffError
from mechdiff.io import to_jsonable
from mechdiff.model.kernels import linear

FORMAT = "mechdiff-hsae/1"


class HierarchicalSAE(nn.Module):
    """P parents x C children per parent; k parents active per row, one child under each active parent."""

    def __init__(self, d_in: int, n_parents: int, n_children: int, k: int, *, seed: int = 0, freeze_steps: int = 0,
                 ortho_coef: float = 0.0, n_teacher: int = 0, metric: np.ndarray | torch.Tensor | None = None
                 ) -> None:
        super().__init__()
        for name, v in (("d_in", d_in), ("n_parents", n_parents), ("n_children", n_children), ("k", k)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise MechdiffError(f"H-SAE {name} must be a positive int, got {v!r}")
        if k > n_parents:
            raise MechdiffError(f"H-SAE k={k} exceeds the number of parents {n_parents}: lower hsae.k")
        self.d_in, self.P, self.C, self.k = d_in, n_parents, n_children, k
        self.n_blocks = 1
        self.freeze_steps, self.ortho_coef, self.n_teacher = int(freeze_steps), float(ortho_coef), int(n_teacher)
        gen = torch.Generator().manual_seed(int(seed))
        dp = F.normalize(torch.randn(n_parents, d_in, generator=gen), dim=1)
        dc = F.normalize(torch.randn(n_parents, n_children, d_in, generator=gen), dim=2)
        self.dec_p = nn.Parameter(dp)
        self.dec_c = nn.Parameter(dc)
        self.W_p = nn.Parameter(dp.clone())
        self.W_c = nn.Parameter(dc.clone())
        self.b_p = nn.Parameter(torch.zeros(n_parents))
        self.b_c = nn.Parameter(torch.zeros(n_parents, n_children))
        self.b_pre = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("input_scale", torch.tensor(1.0))
        self.register_buffer("step", torch.tensor(0, dtype=torch.long))
        M = torch.eye(d_in) if metric is None else torch.as_tensor(np.asarray(metric), dtype=torch.float32)
        if M.shape != (d_in, d_in):
            raise MechdiffError(f"H-SAE metric must be ({d_in}, {d_in}), got {tuple(M.shape)}")
        self.register_buffer("metric", M)
        self.meta: dict = {}

    # ------------------------------------------------------------------ sizes (the SAE interface)
    @property
    def width(self) -> int:
        """All latents: P parents then P * C children (parent p's child j at P + p * C + j)."""
        return self.P * (1 + self.C)

    @property
    def d_total(self) -> int:
        return self.d_in

    # ------------------------------------------------------------------ teacher initialisation
    @torch.no_grad()
    def init_teacher(self, parents: np.ndarray, children: list[np.ndarray]) -> None:
        """Parent p < len(parents) gets decoder (and encoder) direction parents[p]; its children the rows of
        children[p] orthogonalised against the parent under the metric (Gram-Schmidt), the rest stay random."""
        T = len(parents)
        if T > self.P:
            raise MechdiffError(f"{T} teacher parents but the H-SAE has only {self.P}: raise hsae.width")
        M = self.metric.double()
        for p in range(T):
            u = torch.as_tensor(np.asarray(parents[p]), dtype=torch.float64)
            if not bool(torch.isfinite(u).all()) or float(u.norm()) == 0.0:
                raise MechdiffError(f"teacher parent {p} has a zero or non-finite direction: the concept has no "
                                    "usable contexts (give it more covered words, or use more than one parent)")
            u = u / u.norm()
            self.dec_p[p] = u.float()
            self.W_p[p] = u.float()
            kids = np.asarray(children[p], dtype=np.float64).reshape(-1, self.d_in)
            if len(kids) > self.C:
                raise MechdiffError(f"teacher parent {p} has {len(kids)} children but the H-SAE only {self.C} per "
                                    "parent: raise hsae.children")
            for j, v in enumerate(kids):
                v = torch.as_tensor(v)
                v = v - (u @ M @ v) / (u @ M @ u) * u
                if float(v.norm()) > 0:
                    self.dec_c[p, j] = (v / v.norm()).float()
                    self.W_c[p, j] = self.dec_c[p, j]
        self.n_teacher = T

    # ------------------------------------------------------------------ forward pieces
    @torch.no_grad()
    def set_input_scale(self, x: torch.Tensor) -> float:
        msq = float((x.double() ** 2).sum(1).mean())
        if not math.isfinite(msq) or msq <= 0:
            raise MechdiffError("cannot estimate the H-SAE input scale: the first batch is all zeros or not finite")
        self.input_scale.fill_(math.sqrt(self.d_in / msq))
        return float(self.input_scale)

    def scale(self) -> torch.Tensor:
        """The input scale as it multiplies a raw input row (one number: the H-SAE reads one model)."""
        return self.input_scale

    @torch.no_grad()
    def set_scale(self, value: float) -> None:
        """Store an input scale (a checkpoint's, on resume)."""
        self.input_scale.fill_(float(value))

    def _check(self, x) -> torch.Tensor:
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(np.asarray(x, dtype=np.float32))
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.d_in:
            raise MechdiffError(f"H-SAE input must be (n, {self.d_in}), got {getattr(x, 'shape', type(x))}")
        return x.to(self.dec_p.dtype)

    def _codes(self, x_n: torch.Tensor):
        """(parent idx (B, k), parent values (B, k), child idx (B, k), child values (B, k)), values >= 0."""
        xc = x_n - self.b_pre
        pre_p = linear(xc, self.W_p, self.b_p)
        vals, idx = pre_p.topk(self.k, dim=1)
        a = vals.relu()
        pre_c = linear(xc, self.W_c.reshape(-1, self.d_in), self.b_c.reshape(-1))
        pre_c = pre_c.view(-1, self.P, self.C).gather(1, idx[:, :, None].expand(-1, -1, self.C))  # (B, k, C)
        cv, cj = pre_c.max(dim=2)
        b = cv.relu() * (a > 0)
        return idx, a, cj, b

    def _decode_codes(self, idx, a, cj, b) -> torch.Tensor:
        # index_select, not advanced indexing: its backward (index_add) is deterministic on CPU, while the
        # accumulate of `dec_p[idx]`'s backward made the decoder gradients, and so training, vary run to run
        B, k = idx.shape
        dp = self.dec_p.index_select(0, idx.reshape(-1)).view(B, k, self.d_in)  # (B, k, d)
        dc = self.dec_c.view(-1, self.d_in).index_select(0, (idx * self.C + cj).reshape(-1)).view(B, k, self.d_in)
        return torch.einsum("bk,bkd->bd", a, dp) + torch.einsum("bk,bkd->bd", b, dc) + self.b_pre

    def encode(self, x) -> torch.Tensor:
        """Dense codes (B, width) of raw inputs: parents in [0, P), child j of parent p at P + p * C + j."""
        x_n = self._check(x) * self.input_scale
        idx, a, cj, b = self._codes(x_n)
        z = torch.zeros(x_n.shape[0], self.width, dtype=x_n.dtype, device=x_n.device)
        z.scatter_(1, idx, a)
        z.scatter_(1, self.P + idx * self.C + cj, b)
        return z

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw-space reconstruction of dense codes."""
        rec = z[:, : self.P] @ self.dec_p + z[:, self.P :] @ self.dec_c.reshape(-1, self.d_in) + self.b_pre
        return rec / self.input_scale

    def forward(self, x) -> torch.Tensor:
        x_n = self._check(x) * self.input_scale
        return self._decode_codes(*self._codes(x_n)) / self.input_scale

    @torch.no_grad()
    def route(self, x) -> tuple[np.ndarray, np.ndarray]:
        """(top parent, its child) per row: the most active parent and the child that fires under it."""
        x_n = self._check(x) * self.input_scale
        idx, a, cj, _ = self._codes(x_n)
        top = a.argmax(1)
        r = torch.arange(len(top))
        return idx[r, top].cpu().numpy(), cj[r, top].cpu().numpy()

    # ------------------------------------------------------------------ training interface (train_sae)
    def _ortho(self) -> torch.Tensor:
        """mean over every parent p and child j of cos_M(D_p[p], D_c[p, j])^2."""
        M = self.metric
        up = self.dec_p @ M  # (P, d)
        num = torch.einsum("pd,pcd->pc", up, self.dec_c)
        nu = torch.einsum("pd,pd->p", up, self.dec_p)
        nc = torch.einsum("pcd,pcd->pc", self.dec_c @ M, self.dec_c)
        return (num ** 2 / (nu[:, None] * nc).clamp_min(1e-12)).mean()

    def training_loss(self, x_n: torch.Tensor, dead: torch.Tensor | None = None, *, aux_coef: float = 0.0,
                      sparse: bool = True, select_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, dict]:
        """Normalised reconstruction error (FVU of the batch) plus the causal orthogonality penalty."""
        B = x_n.shape[0]
        idx, a, cj, b = self._codes(x_n)
        x_hat = self._decode_codes(idx, a, cj, b)
        denom = (x_n.var(0, correction=0).sum() * B).clamp_min(1e-12)
        main = F.mse_loss(x_hat, x_n, reduction="sum") / denom
        loss = main
        aux = 0.0
        if self.ortho_coef > 0:
            pen = self._ortho()
            loss = loss + self.ortho_coef * pen
            aux = float(pen.detach())
        with torch.no_grad():
            fired = torch.zeros(self.width, dtype=torch.bool, device=x_n.device)
            fired[idx[a > 0]] = True
            fired[(self.P + idx * self.C + cj)[b > 0]] = True
            l0 = float((a > 0).sum() + (b > 0).sum()) / B
        self.step += 1
        return loss, {"fvu": float(main.detach()), "l0": l0, "aux": aux, "fired": fired}

    @torch.no_grad()
    def project_decoder_grad_(self) -> None:
        """Keep decoder atoms on the unit sphere (drop the radial gradient); in stage A freeze the teacher parents."""
        for g, w in ((self.dec_p.grad, self.dec_p), (self.dec_c.grad, self.dec_c)):
            if g is not None:
                g -= (g * w).sum(-1, keepdim=True) * w
        if self.dec_p.grad is not None and int(self.step) <= self.freeze_steps and self.n_teacher:
            self.dec_p.grad[: self.n_teacher] = 0.0

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        self.dec_p.copy_(F.normalize(self.dec_p, dim=-1))
        self.dec_c.copy_(F.normalize(self.dec_c, dim=-1))

    def release_workspace(self) -> None:
        """Nothing cached (the SAE loop calls this at the end)."""

    def config_dict(self) -> dict:
        return {"architecture": "hsae", "d_in": self.d_in, "n_parents": self.P, "n_children": self.C, "k": self.k,
                "width": self.width, "freeze_steps": self.freeze_steps, "ortho_coef": self.ortho_coef,
                "n_teacher": self.n_teacher, "input_scale": float(self.input_scale)}

    def save(self, out_dir: str | Path, *, meta: dict | None = None) -> Path:
        """Write `hsae.safetensors` (every parameter and buffer) and `cfg.json` into `out_dir`."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if meta:
            self.meta.update(meta)
        tmp = out / ".hsae.safetensors.tmp"
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(tmp),
                  metadata={"format": FORMAT})
        os.replace(tmp, out / "hsae.safetensors")
        cfg = {"format": FORMAT, **self.config_dict(), **self.meta}
        tmpj = out / ".cfg.json.tmp"
        tmpj.write_text(json.dumps(to_jsonable(cfg), indent=2, sort_keys=True))
        os.replace(tmpj, out / "cfg.json")
        return out


def load_hsae(out_dir: str | Path) -> HierarchicalSAE:
    """Load an H-SAE written by `HierarchicalSAE.save`."""
    from safetensors.torch import load_file

    d = Path(out_dir)
    if not (d / "hsae.safetensors").is_file() or not (d / "cfg.json").is_file():
        raise MechdiffError(f"no H-SAE in {d}: expected hsae.safetensors and cfg.json (run the hsae stage)")
    cfg = json.loads((d / "cfg.json").read_text())
    m = HierarchicalSAE(int(cfg["d_in"]), int(cfg["n_parents"]), int(cfg["n_children"]), int(cfg["k"]),
                        freeze_steps=int(cfg.get("freeze_steps", 0)), ortho_coef=float(cfg.get("ortho_coef", 0)),
                        n_teacher=int(cfg.get("n_teacher", 0)))
    m.load_state_dict(load_file(str(d / "hsae.safetensors")))
    own = set(m.config_dict()) | {"format"}
    m.meta = {k: v for k, v in cfg.items() if k not in own}
    return m


# ------------------------------------------------------------------------------------------------ concept metrics


def match_parents(codes: np.ndarray, labels: np.ndarray, n_concepts: int) -> np.ndarray:
    """Latent matched to each concept parent (one-to-one, Hungarian) by mean code on its contexts minus elsewhere.

    codes (n, P) parent codes on concept contexts, labels (n,) concept parent index of each context."""
    from scipy.optimize import linear_sum_assignment

    codes = np.asarray(codes, dtype=np.float64)
    score = np.zeros((n_concepts, codes.shape[1]))
    for c in range(n_concepts):
        m = labels == c
        if m.any():
            score[c] = codes[m].mean(0) - (codes[~m].mean(0) if (~m).any() else 0.0)
    r, col = linear_sum_assignment(-score)
    out = np.full(n_concepts, -1, dtype=np.int64)
    out[r] = col
    return out


def purity_leakage(codes: np.ndarray, labels: np.ndarray, match: np.ndarray) -> list[dict]:
    """Per concept parent c with latent j = match[c]: purity = mean code on c's contexts / (that + mean code on
    the other concepts' contexts) (0.5 = no preference, 1 = fires only on c); leakage = share of the other
    concepts' contexts on which j fires; recall = share of c's contexts on which j fires."""
    rows = []
    for c, j in enumerate(match):
        m = labels == c
        if j < 0 or not m.any() or m.all():
            continue
        a_in, a_out = float(codes[m, j].mean()), float(codes[~m, j].mean())
        rows.append({"concept": c, "latent": int(j),
                     "purity": a_in / (a_in + a_out) if a_in + a_out > 0 else float("nan"),
                     "leakage": float((codes[~m, j] > 0).mean()), "recall": float((codes[m, j] > 0).mean())})
    return rows


def atom_recovery(learned: np.ndarray, planted: np.ndarray, threshold: float = 0.9) -> float:
    """Share of planted atoms (rows) whose best |cosine| with a learned atom is at least `threshold`."""
    L = learned / np.linalg.norm(learned, axis=1, keepdims=True)
    Q = planted / np.linalg.norm(planted, axis=1, keepdims=True)
    return float((np.abs(Q @ L.T).max(1) >= threshold).mean())


def context_teacher(X: np.ndarray, owner: Sequence[str], parents: Sequence[str],
                    children: Sequence[Sequence[Sequence[str]]], parent_words: Sequence[Sequence[str]],
                    method: str = "mean") -> tuple[np.ndarray, list[np.ndarray]]:
    """A teacher from labelled activations at the H-SAE's own site: each parent's concept vector over the rows of
    its words (`concept_vector`; the plain mean by default: in raw activations the LDA form divides by the
    within-concept covariance, which down-weights the concept's own direction when its strength varies) minus
    the mean of every parent's rows (what all concept contexts share), each child's vector minus its parent's.

    X (n, d) rows whose word is owner[i]; parents[p] has words parent_words[p] and children's word lists
    children[p]. Rows of words in none of the lists are ignored."""
    from mechdiff.analysis.geometry import concept_vector

    rows: dict[str, list[int]] = {}
    for i, w in enumerate(owner):
        rows.setdefault(w, []).append(i)

    def vec(words: Sequence[str]) -> np.ndarray | None:
        r = [i for w in words for i in rows.get(w, [])]
        return concept_vector(X[r], method) if len(r) >= 2 else None

    labelled = [i for ws in parent_words for w in ws for i in rows.get(w, [])]
    centre = X[labelled].mean(0) if labelled else 0.0  # what every concept context shares
    if len(parents) < 2:
        raise MechdiffError("a context teacher needs at least two concept parents (each is taken relative to "
                            "what all of them share): extend the concept hierarchy or set hsae.teacher: unembedding")
    par, kids = [], []
    for p in range(len(parents)):
        lp = vec(parent_words[p])
        if lp is None:
            raise MechdiffError(f"no context rows for concept parent {parents[p]!r}: its words are not covered")
        par.append(lp - centre)
        ks = [v - lp for v in (vec(ws) for ws in children[p]) if v is not None]
        kids.append(np.stack(ks) if ks else np.zeros((0, X.shape[1])))
    return np.stack(par), kids


def concept_summary(hsae: HierarchicalSAE, X_ctx: np.ndarray, labels: np.ndarray, n_concepts: int
                    ) -> tuple[dict, list[dict], np.ndarray]:
    """Purity, leakage and recall of the parent latents matched to the concept parents on concept contexts
    (rows X_ctx with parent index `labels`): (means, per-concept rows, matched latent per concept)."""
    with torch.no_grad():
        codes = hsae.encode(torch.from_numpy(np.asarray(X_ctx, dtype=np.float32)))[:, : hsae.P].numpy()
    match = match_parents(codes, labels, n_concepts)
    rows = purity_leakage(codes, labels, match)
    summ = {key: float(np.nanmean([r[key] for r in rows])) if rows else None
            for key in ("purity", "leakage", "recall")}
    summ["teacher_latent_kept"] = float(np.mean(match[: hsae.n_teacher] == np.arange(min(hsae.n_teacher, n_concepts))
                                                )) if hsae.n_teacher else None
    return summ, rows, match


def atom_cos(a: HierarchicalSAE, b: HierarchicalSAE, pa: int, pb: int) -> tuple[float, float]:
    """(|cos| of parent atoms a[pa], b[pb]; mean over a's children of the best |cos| with one of b's children)."""
    with torch.no_grad():
        cp = float(torch.abs(F.cosine_similarity(a.dec_p[pa], b.dec_p[pb], dim=0)))
        cc = torch.abs(F.normalize(a.dec_c[pa], dim=1) @ F.normalize(b.dec_c[pb], dim=1).t()).max(1).values
    return cp, float(cc.mean())


def teacher_targets(random: dict, teacher: dict) -> dict:
    """The seed's targets for teacher vs random initialisation: purity +10 pp, leakage and steering leakage -20%
    (relative), reconstruction parity (teacher FVU at most 10% above random's)."""
    def rel_drop(key: str) -> float | None:
        r, t = random.get(key), teacher.get(key)
        if r is None or t is None or not np.isfinite(r) or not np.isfinite(t) or r <= 0:
            return None
        return 1.0 - t / r

    pp = (100 * (teacher["purity"] - random["purity"]) if teacher.get("purity") is not None
          and random.get("purity") is not None else None)
    out = {"purity_gain_pp": pp, "leakage_reduction": rel_drop("leakage"),
           "steering_leakage_reduction": rel_drop("steering_leakage"),
           "fvu_ratio": teacher["fvu"] / random["fvu"] if random.get("fvu") else None}
    out["met"] = {"purity": pp is not None and pp >= 10,
                  "leakage": out["leakage_reduction"] is not None and out["leakage_reduction"] >= 0.2,
                  "steering_leakage": (out["steering_leakage_reduction"] is not None
                                       and out["steering_leakage_reduction"] >= 0.2),
                  "reconstruction_parity": out["fvu_ratio"] is not None and out["fvu_ratio"] <= 1.1}
    return out


def evaluate_hsae(m: HierarchicalSAE, model, tokenizer, enc, val_rows: np.ndarray, site, X_val: np.ndarray,
                  X_ctx: np.ndarray, labels: np.ndarray, names: Sequence[str], prompts: Sequence[str],
                  token_sets: dict, *, steer_scale: float, positions: str, batch_size: int
                  ) -> tuple[dict, list[dict], np.ndarray]:
    """Every H-SAE number on one model: FVU / L0 / dead % on X_val, CE / KL recovered spliced at `site` on the
    prompts `val_rows` of `enc`, concept purity / leakage / recall on labelled contexts X_ctx, and the steering
    effect and leakage of each matched parent atom (`site_interventions` on `prompts` over `token_sets`).
    Returns (summary, per-concept rows, matched latent per concept)."""
    from mechdiff.analysis.geometry import median_of, site_interventions
    from mechdiff.sae.evaluate import eval_sae, spliced_metrics

    ev = eval_sae(m, X_val)
    sp = spliced_metrics(model, enc, val_rows, site, m, positions=positions, batch_size=batch_size)
    summ, per, match = concept_summary(m, X_ctx, labels, len(names))
    with torch.no_grad():  # parents without held-out tokens have nothing to measure a push on
        dirs = {n: m.dec_p[match[i]].double().numpy() for i, n in enumerate(names)
                if match[i] >= 0 and len(token_sets.get(n, ())) > 0}
    steer = site_interventions(model, tokenizer, prompts, site, dirs, token_sets, scale=steer_scale)
    res = {"fvu": ev["fvu"], "l0": ev["l0"], "dead_pct": ev["dead_pct"], "ce_recovered": sp["ce_recovered"],
           "kl_recovered": sp["kl_recovered"], **summ, "steering_effect": median_of(steer, "effect"),
           "steering_leakage": median_of(steer, "leakage")}
    by = {r["concept"]: r for r in steer}
    rows = [{"concept": names[r["concept"]], "latent": r["latent"], "purity": r["purity"], "leakage": r["leakage"],
             "recall": r["recall"], "steering_effect": by.get(names[r["concept"]], {}).get("effect"),
             "steering_leakage": by.get(names[r["concept"]], {}).get("leakage")} for r in per]
    return res, rows, match


def compare_children(base: HierarchicalSAE, tuned: HierarchicalSAE, match_base: np.ndarray, match_tuned: np.ndarray,
                     names: Sequence[str]) -> tuple[dict, list[dict]]:
    """Per concept parent: |cos| of the two H-SAEs' matched parent atoms and the mean best |cos| of their
    children (`atom_cos`), lowest children cosine first; the summary's medians and the three most changed."""
    from mechdiff.analysis.geometry import median_of

    rows = []
    for i, n in enumerate(names):
        a, b = int(match_base[i]), int(match_tuned[i])
        if a >= 0 and b >= 0:
            cp, cc = atom_cos(base, tuned, a, b)
            rows.append({"concept": n, "parent_cos": cp, "children_cos": cc})
    rows.sort(key=lambda r: r["children_cos"])
    return ({"median_parent_cos": median_of(rows, "parent_cos"), "median_children_cos": median_of(rows, "children_cos"),
             "most_changed_children": [r["concept"] for r in rows[:3]]}, rows)
