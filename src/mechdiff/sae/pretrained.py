"""Pretrained SAEs from outside the project, imported as mechdiff SAEs (`TopKSAE`) with the same encode and decode.

Formats (a spec is a local path, or `hf:<org>/<repo>/<folder>[@<revision>]` for a folder of a Hugging Face repo):
- Gemma Scope (`params.npz`: W_enc (d, w), W_dec (w, d), b_enc (w,), b_dec (d,), threshold (w,); JumpReLU on
  the raw input, no b_dec subtracted before the encoder),
- SAELens (`cfg.json` + `sae_weights.safetensors`; architectures standard, jumprelu and topk; W_enc (d, w),
  W_dec (w, d), b_enc, b_dec, threshold or log_threshold; `apply_b_dec_to_input` as its cfg says),
- mechdiff's own SAE folders (`cfg.json` + `sae.safetensors`, `model.save_sae`).

The import is exact up to float rounding: each latent's decoder row is scaled to unit norm (the project's
convention) and the latent itself by the inverse, so z_j d_j, the reconstruction and which latents fire are
unchanged; JumpReLU and standard ReLU SAEs become per-latent thresholds (`TopKSAE(jumprelu=True)`, threshold 0
for ReLU); a b_enc of an SAE that does not subtract b_dec is rewritten for one that does.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from mechdiff.errors import MechdiffError
from mechdiff.sae.model import TopKSAE, load_sae

GEMMA_SCOPE = "params.npz"
SAELENS_WEIGHTS = "sae_weights.safetensors"
CFG = "cfg.json"


def _hub_files(spec: str) -> Path:
    """Download the SAE files of `hf:<org>/<repo>/<folder>[@rev]` (Gemma Scope or SAELens) and return the folder."""
    body, _, rev = spec.removeprefix("hf:").partition("@")
    parts = [x for x in body.split("/") if x]
    if len(parts) < 2:
        raise MechdiffError(f"pretrained SAE {spec!r}: write hf:<org>/<repo>/<folder inside the repo>[@<revision>]")
    repo, folder = "/".join(parts[:2]), "/".join(parts[2:])
    from huggingface_hub import hf_hub_download

    def get(name: str) -> Path:
        return Path(hf_hub_download(repo, f"{folder}/{name}" if folder else name, revision=rev or None))

    errors = []
    for names in ((GEMMA_SCOPE,), (CFG, SAELENS_WEIGHTS)):
        try:
            paths = [get(n) for n in names]
            return paths[0].parent
        except Exception as e:  # noqa: BLE001 - offline, missing file, gated repo: try the other format, then say why
            errors.append(f"{'+'.join(names)}: {type(e).__name__}")
    raise MechdiffError(f"pretrained SAE {spec!r}: could not fetch params.npz or cfg.json + {SAELENS_WEIGHTS} from the "
                        f"hub ({'; '.join(errors)}): check the repo, folder and network, or give a local path")


def resolve(spec: str) -> Path:
    """The local file or folder of a pretrained SAE spec (downloaded first for hf: specs)."""
    if not isinstance(spec, str) or not spec.strip():
        raise MechdiffError(f"pretrained SAE spec must be a path or hf:<org>/<repo>/<folder>, got {spec!r}")
    if spec.startswith("hf:"):
        return _hub_files(spec)
    path = Path(spec).expanduser()
    if not path.exists():
        raise MechdiffError(f"pretrained SAE {spec!r} does not exist: give a params.npz file, or a folder with "
                            f"params.npz, {CFG} + {SAELENS_WEIGHTS} (SAELens) or {CFG} + sae.safetensors (mechdiff)")
    return path


def _file_of(path: Path) -> Path:
    """The file whose bytes identify the SAE (for provenance and fingerprints)."""
    if path.is_file():
        return path
    for name in (GEMMA_SCOPE, SAELENS_WEIGHTS, "sae.safetensors"):
        if (path / name).is_file():
            return path / name
    raise MechdiffError(f"pretrained SAE folder {path} holds none of {GEMMA_SCOPE}, {CFG} + {SAELENS_WEIGHTS} or "
                        f"{CFG} + sae.safetensors")


def digest(spec: str) -> str:
    """sha256 of the SAE's weights file and, beside it, its cfg.json (hub specs are downloaded first)."""
    h = hashlib.sha256()
    weights = _file_of(resolve(spec))
    for path in (weights, weights.parent / CFG):
        if path.is_file():
            with open(path, "rb") as f:
                for chunk in iter(lambda f=f: f.read(1 << 24), b""):
                    h.update(chunk)
    return h.hexdigest()


def _array(t: dict, key: str, what: str) -> np.ndarray:
    if key not in t:
        raise MechdiffError(f"{what} lacks {key!r} (has {', '.join(sorted(t))})")
    a = np.asarray(t[key], dtype=np.float32)  # float32 like the weights: a 131k-wide SAE stays within its size
    if not np.isfinite(a).all():
        raise MechdiffError(f"{what}: {key} holds NaN or inf values")
    return a


def from_weights(W_enc, b_enc, W_dec, b_dec, *, threshold=None, k: int | None = None,
                 b_dec_to_input: bool = True, what: str = "pretrained SAE") -> TopKSAE:
    """A mechdiff SAE equal to the SAE z = f(pre), pre = (x - [b_dec]) W_enc + b_enc, x_hat = z W_dec + b_dec.

    f: top-k then ReLU (k given), else JumpReLU pre * (pre > threshold) with ReLU (threshold None: 0, plain ReLU).
    W_enc (d, w), W_dec (w, d), b_enc (w,), b_dec (d,), threshold (w,) or a scalar; `b_dec_to_input`: whether the
    encoder sees x - b_dec (SAELens' apply_b_dec_to_input) or x (Gemma Scope)."""
    W_enc, W_dec = np.asarray(W_enc, np.float32), np.asarray(W_dec, np.float32)
    b_enc, b_dec = np.asarray(b_enc, np.float64), np.asarray(b_dec, np.float64)
    if W_enc.ndim != 2 or W_dec.shape != W_enc.shape[::-1] or b_enc.shape != (W_enc.shape[1],) \
            or b_dec.shape != (W_enc.shape[0],):
        raise MechdiffError(f"{what}: inconsistent shapes W_enc {W_enc.shape}, W_dec {W_dec.shape}, b_enc {b_enc.shape}, "
                            f"b_dec {b_dec.shape} (expected (d, w), (w, d), (w,), (d,))")
    d, w = W_enc.shape
    # float64 sums without a float64 copy of the weights (einsum casts in buffers)
    if not b_dec_to_input:  # x W + b = (x - b_dec) W + (b + b_dec W)
        b_enc = b_enc + np.einsum("i,ij->j", b_dec, W_enc, dtype=np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", W_dec, W_dec, dtype=np.float64))
    norms = np.where(norms > 0, norms, 1.0)  # a latent with a zero decoder row writes nothing either way
    if k is not None:
        if not 1 <= int(k) <= w:
            raise MechdiffError(f"{what}: k={k} must lie in [1, width {w}]")
        if np.abs(norms - 1).max() > 1e-3:  # the top k of n_j pre_j is not the top k of pre_j
            raise MechdiffError(f"{what}: a TopK SAE imports exactly only with unit-norm decoder rows (norms "
                                f"{norms.min():.3g} .. {norms.max():.3g}): its top-k selection depends on them")
        norms = np.ones(w)  # kept as they are: rescaling would move the selection by rounding
        sae = TopKSAE(d, w, int(k))
    else:
        sae = TopKSAE(d, w, w, jumprelu=True)
        th = np.broadcast_to(np.asarray(0.0 if threshold is None else threshold, np.float64), (w,))
        if not np.isfinite(th).all():
            raise MechdiffError(f"{what}: threshold holds NaN or inf values")
        sae.set_thresholds(torch.from_numpy(th * norms).float())
    with torch.no_grad():
        n32 = torch.from_numpy(norms).float()
        sae.W_enc.copy_(torch.from_numpy(W_enc).t() * n32[:, None])
        sae.b_enc.copy_(torch.from_numpy(b_enc * norms).float())
        sae.dec.copy_(torch.from_numpy(W_dec) / n32[:, None])
        sae.b_pre.copy_(torch.from_numpy(b_dec).float())
        sae.input_scale.fill_(1.0)
    return sae


def _gemma_scope(path: Path) -> TopKSAE:
    what = f"Gemma Scope SAE {path}"
    try:
        with np.load(path) as z:
            t = {("W_" + key[2:] if key.startswith("w_") else key): z[key] for key in z.files}
    except (OSError, ValueError, EOFError) as e:
        raise MechdiffError(f"{what} is not a readable npz file ({type(e).__name__}: {str(e)[:120]})") from e
    if "scaling_factor" in t and not np.allclose(t["scaling_factor"], 1.0):
        raise MechdiffError(f"{what} has a scaling_factor other than 1 (it scales the latents): fold it into the rows "
                            "of W_dec first")
    return from_weights(_array(t, "W_enc", what), _array(t, "b_enc", what), _array(t, "W_dec", what),
                        _array(t, "b_dec", what), threshold=_array(t, "threshold", what), b_dec_to_input=False,
                        what=what)


def _saelens(folder: Path) -> TopKSAE:
    from safetensors.torch import load_file

    what = f"SAELens SAE {folder}"
    try:
        cfg = json.loads((folder / CFG).read_text())
    except (OSError, ValueError) as e:
        raise MechdiffError(f"{what}: cannot read {CFG} ({str(e)[:120]})") from e
    if not isinstance(cfg, dict):
        raise MechdiffError(f"{what}: {CFG} is not a JSON object")
    arch = str(cfg.get("architecture", "standard"))
    if arch not in ("standard", "jumprelu", "topk"):
        raise MechdiffError(f"{what}: architecture {arch!r} is not supported (standard, jumprelu, topk)")
    act = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))  # SAELens before 6: topk was an activation
    if arch == "standard" and act == "topk":
        arch = "topk"
    elif act not in ("relu", "topk", None):
        raise MechdiffError(f"{what}: activation {act!r} is not supported (relu, topk)")
    k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
    if arch == "topk" and not (isinstance(k, int) and not isinstance(k, bool) and k >= 1):
        raise MechdiffError(f"{what}: a topk SAE needs an integer k in {CFG} (k or activation_fn_kwargs.k), got {k!r}")
    norm = cfg.get("normalize_activations", "none")
    if norm not in (None, "none", False):
        raise MechdiffError(f"{what}: normalize_activations {norm!r}: only SAEs on raw activations import exactly "
                            "(fold the normalisation into the weights first)")
    if cfg.get("hook_head_index") is not None or cfg.get("reshape_activations", "none") not in (None, "none"):
        raise MechdiffError(f"{what}: SAEs on reshaped or per-head activations are not supported")
    try:  # torch reads every dtype (bf16 included); the import works in float32
        t = {key: v.float().numpy() for key, v in load_file(str(folder / SAELENS_WEIGHTS)).items()}
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: one line, not a traceback
        raise MechdiffError(f"{what}: cannot read {SAELENS_WEIGHTS} ({type(e).__name__}: {str(e)[:120]})") from e
    if arch == "jumprelu" and "threshold" not in t and "log_threshold" in t:
        t["threshold"] = np.exp(t["log_threshold"])
    sf = t.get("finetuning_scaling_factor", t.get("scaling_factor"))
    if sf is not None and not np.allclose(sf, 1.0):  # older SAELens decodes (z * sf) W_dec + b_dec: exact in W_dec
        t["W_dec"] = t["W_dec"] * np.broadcast_to(np.asarray(sf, np.float32).reshape(-1, 1), (t["W_dec"].shape[0], 1))
    return from_weights(_array(t, "W_enc", what), _array(t, "b_enc", what), _array(t, "W_dec", what),
                        _array(t, "b_dec", what),
                        threshold=_array(t, "threshold", what) if arch == "jumprelu" else None,
                        k=k if arch == "topk" else None,
                        b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)), what=what)


def load_pretrained(spec: str, *, d_in: int | None = None) -> TopKSAE:
    """Import the SAE of `spec` (see the module doc); `d_in`: the width of the activations it will read, checked."""
    path = resolve(spec)
    if path.is_file():
        if path.name.endswith(".npz"):
            sae = _gemma_scope(path)
        else:
            raise MechdiffError(f"pretrained SAE {spec!r}: a file must be a Gemma Scope params.npz; give the folder "
                                "of a SAELens or mechdiff SAE instead")
    elif (path / GEMMA_SCOPE).is_file():
        sae = _gemma_scope(path / GEMMA_SCOPE)
    elif (path / SAELENS_WEIGHTS).is_file():
        sae = _saelens(path)
    elif (path / "sae.safetensors").is_file():
        try:
            sae = load_sae(path)
        except MechdiffError:
            raise
        except Exception as e:  # noqa: BLE001 - a broken cfg.json or tensor file: one line
            raise MechdiffError(f"mechdiff SAE {path} is not readable ({type(e).__name__}: {str(e)[:120]})") from e
    else:
        _file_of(path)  # raises with what a folder must hold
        raise AssertionError("unreachable")
    if d_in is not None and sae.d_total != d_in:
        raise MechdiffError(f"pretrained SAE {spec!r} reads {sae.d_total}-wide inputs, the site has width {d_in}: "
                            "it was trained on another model or site")
    return sae
