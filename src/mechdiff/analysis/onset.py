"""Where a change starts across layers: the one rule the divergence metrics and the report's summary share."""

from __future__ import annotations

import math
from collections.abc import Mapping

from mechdiff.model.sites import Site

CKA_TOL = 1e-3  # a site has changed when 1 - CKA(base, tuned) exceeds this (float noise is ~1e-6)
KL_TOL = 1e-4  # nats; the layer patch moves the output where its KL exceeds this (unchanged layers give 0)


def _layer(name: str) -> int:
    return Site.parse(name).layer if "." in name else int(name.lstrip("L"))


_FORWARD = {kind: i for i, kind in enumerate(("resid_pre", "attn_out", "mlp_out", "resid_post"))}


def cka_onset(cka: Mapping[str, Mapping[str, float | None]], view: str = "last"
              ) -> tuple[str | None, str | None]:
    """(first changed site, lowest-CKA site) over every site of `cka` ({site: {view: CKA}}): a site has changed
    when 1 - CKA > CKA_TOL; the first is the one of the lowest layer and, within a layer, the first in forward
    order (resid_pre, attn_out, mlp_out, resid_post): the sites after a changed one inherit its change and often
    show a lower CKA. (None, None) when none changed."""
    rows = sorted(((name, v[view]) for name, v in cka.items() if v.get(view) is not None),
                  key=lambda t: (_layer(t[0]), _FORWARD.get(t[0].rsplit(".", 1)[-1], len(_FORWARD)), t[1]))
    changed = [(s, c) for s, c in rows if 1 - c > CKA_TOL]
    if not changed:
        return None, None
    return changed[0][0], min(changed, key=lambda t: t[1])[0]


def most_changed_layers(cka: Mapping[str, Mapping[str, float | None]], k: int = 2, view: str = "last",
                        kind: str = "resid_post") -> list[int]:
    """The k layers of lowest CKA at their `kind` site (seed 002 R1: "choose the top-2 layers"), lowest first
    (ties: the lower layer); fewer when fewer sites have a CKA."""
    rows = sorted((v[view], _layer(name)) for name, v in cka.items()
                  if name.endswith(f".{kind}") and v.get(view) is not None and math.isfinite(v[view]))
    return [layer for _, layer in rows[:k]]


def kl_onset(kl_by_layer: Mapping[str, float]) -> int | None:
    """The first layer ("L<n>" keys) whose KL exceeds KL_TOL, or None."""
    return next((layer for layer, v in sorted((_layer(k), v) for k, v in kl_by_layer.items()) if v > KL_TOL), None)
