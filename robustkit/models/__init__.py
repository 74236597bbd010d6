"""Models: the built-in zoo and loaders for models that users bring."""

from robustkit.models.loading import check_logits, load_model, parse_normalize
from robustkit.models.zoo import ARCHITECTURES, Normalized, build_model

__all__ = ["ARCHITECTURES", "Normalized", "build_model", "check_logits", "load_model",
           "parse_normalize"]
