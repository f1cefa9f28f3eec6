"""TopK / BatchTopK sparse autoencoders and crosscoders: model, streaming trainer, evaluation."""

from mechdiff.sae.evaluate import eval_sae, spliced_metrics
from mechdiff.sae.model import TopKSAE, load_sae, save_sae
from mechdiff.sae.train import SAEConfig, train_sae

__all__ = ["SAEConfig", "TopKSAE", "eval_sae", "load_sae", "save_sae", "spliced_metrics", "train_sae"]
