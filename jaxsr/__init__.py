"""jaxsr: Self-Rewarding Language Models (Yuan et al., 2024) in JAX."""

from .judge import parse_score
from .losses import preference_loss
from .model import ConfigError, ModelConfig, ShardingError, ShardingRules, make_mesh
from .pairs import select_pair
from .policy import Policy, forward_logits, load_policy, random_policy, save_checkpoint, save_hf

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "ModelConfig", "Policy", "ShardingError", "ShardingRules", "forward_logits", "load_policy",
    "make_mesh", "parse_score", "preference_loss", "random_policy", "save_checkpoint", "save_hf", "select_pair",
]
