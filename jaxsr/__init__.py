"""jaxsr: Self-Rewarding Language Models (Yuan et al., 2024) in JAX."""

import os as _os

# jaxsr uses transformers for tokenizers, configs and file formats only; its "PyTorch was not found" advice is noise.
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from .chat import chat_token_ids, render_user_turn
from .judge import parse_score
from .losses import preference_loss
from .model import ConfigError, ModelConfig, ShardingError, ShardingRules, make_mesh
from .pairs import select_pair
from .policy import Policy, forward_logits, load_policy, random_policy, save_checkpoint, save_hf
from .sample import Completion, generate

__version__ = "0.1.0"

__all__ = [
    "Completion", "ConfigError", "ModelConfig", "Policy", "ShardingError", "ShardingRules", "chat_token_ids",
    "forward_logits", "generate", "load_policy", "make_mesh", "parse_score", "preference_loss", "random_policy",
    "render_user_turn", "save_checkpoint", "save_hf", "select_pair",
]
