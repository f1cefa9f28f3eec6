"""The gates' thresholds and sizes, and their one set of rules: `analysis.gates` runs with them, and
`params.validate` (every stage's params check, and `mechdiff params --check`) checks `gates.*` by building one.
Light on purpose (no numpy or torch), since every stage imports it."""

from __future__ import annotations

from dataclasses import dataclass

from mechdiff.errors import MechdiffError


@dataclass(frozen=True)
class GateSettings:
    """Thresholds and sizes of the gates (mirroring params `gates.*`; defaults are the seed's values)."""

    match_cos: float = 0.7  # counterparts across SAEs: |decoder cosine| >= this
    top_share: float = 0.1  # distribution variance: the top share of all features pass (seed: 10%)
    max_freq: float = 20 / 615  # sparsity: token firing frequency on held-out cultural prompts below (seed: L0 < 20 of 615)
    min_regions: int = 3  # coverage: regions fired on (seed: >= 3 subcultures)
    max_features: int = 3  # survivors of the cheap gates measured with the models, per SAE (largest variance first)
    min_effect: float = 0.05  # causal: relative behaviour change above this (seed: > 5%) ...
    min_kl: float = 0.05  # ... or decision-token KL (nats) above this
    prob_floor: float = 1e-3  # relative behaviour change is 0 when the clean mean probability is below this
    d_min: float = 0.8  # corruption consistency: mean Cohen's d above this ...
    sd_max: float = 0.3  # ... and SD across methods below this
    side_budget: float = 0.2  # side effects: relative neutral accuracy change and signature-rate change below (seed: 20%)
    ccis_min: float = 1.5
    alpha: float = 0.001
    n_perm: int = 2000
    ccis_eps: float = 0.01  # keeps the CCIS finite when every loss term is 0
    max_rows: int = 16384  # token rows of train cultural prompts for the mean activations
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("match_cos", "top_share", "max_freq"):
            v = getattr(self, name)
            if not 0 < v <= 1:
                raise MechdiffError(f"gates.{name} must lie in (0, 1], got {v}")
        for name in ("min_regions", "max_features", "n_perm", "max_rows", "batch_size"):
            if getattr(self, name) < 1:
                raise MechdiffError(f"gates.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("min_effect", "min_kl", "d_min", "ccis_min", "ccis_eps"):
            if not getattr(self, name) >= 0:
                raise MechdiffError(f"gates.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.side_budget <= 1:  # a relative change and a rate change: above 1 nothing could fail it
            raise MechdiffError(f"gates.side_budget must lie in [0, 1], got {self.side_budget}")
        if not self.sd_max > 0:  # the consistency gate keeps sd < sd_max: at 0 nothing could pass
            raise MechdiffError(f"gates.sd_max must be > 0, got {self.sd_max}")
        if not 0 < self.alpha < 1:
            raise MechdiffError(f"gates.alpha must lie in (0, 1), got {self.alpha}")
