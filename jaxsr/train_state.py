"""The optimizer (AdamW after global-norm clipping, warmup + decay) and the train state it updates, with shardings.

The train state is a plain pytree {"params", "opt_state", "step"} that Orbax saves as is; each optimizer-state
leaf lives where the parameter it tracks lives.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from .config import TrainSection
from .model import decoder
from .model.config import ModelConfig
from .model.sharding import DEFAULT_RULES, ShardingError, ShardingRules, replicated
from .policy import param_shardings

State = dict[str, Any]


# --- optimizer ----------------------------------------------------------------------------------------------

def learning_rate_schedule(section: TrainSection, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 over `warmup_steps`, then cosine/linear decay reaching `final_lr` at the last update."""
    lr, final, warm = section.lr, section.final_lr, section.warmup_steps
    last = max(total_steps - 1, warm + 1)
    if section.schedule == "cosine":
        if warm == 0:
            return optax.cosine_decay_schedule(lr, last, alpha=final / lr)
        return optax.warmup_cosine_decay_schedule(0.0, lr, warm, last, final)
    decay = optax.linear_schedule(lr, final, last - warm) if section.schedule == "linear" else optax.constant_schedule(lr)
    if warm == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), decay], [warm])


def _decay_mask(params):
    # As transformers' Trainer: no weight decay on norm scales and biases.
    def decays(path, _):
        name = str(getattr(path[-1], "key", path[-1]))
        return not (name.endswith("norm") or name.startswith("b"))

    return jax.tree.map_with_path(decays, params)


def make_optimizer(section: TrainSection, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = learning_rate_schedule(section, total_steps)
    adamw = optax.adamw(schedule, b1=section.adam_b1, b2=section.adam_b2, weight_decay=section.weight_decay,
                        mask=_decay_mask)
    tx = optax.chain(optax.clip_by_global_norm(section.clip_norm), adamw) if section.clip_norm > 0 else adamw
    return tx, schedule


# --- state and shardings ------------------------------------------------------------------------------------

def init_state(params, tx) -> State:
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}


def _abstract_params(cfg: ModelConfig, dtype):
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype), decoder.param_shapes(cfg),
                        is_leaf=lambda x: isinstance(x, tuple))


def state_shardings(cfg: ModelConfig, mesh, tx, dtype, rules: ShardingRules = DEFAULT_RULES) -> State:
    """Params FSDP x tensor; each optimizer-state leaf sharded like the parameter it tracks; scalars replicated."""
    param_sh = param_shardings(cfg, mesh, rules)
    abstract = _abstract_params(cfg, dtype)
    by_path = {tuple(p): (s, a.shape) for (p, s), a in zip(jax.tree_util.tree_flatten_with_path(param_sh)[0],
                                                            jax.tree.leaves(abstract))}

    def one(path, leaf):
        path = tuple(path)
        for k in range(len(path)):  # mu['layers']['wq'] ends with the path of param ['layers']['wq']
            hit = by_path.get(path[k:])
            if hit is not None and hit[1] == leaf.shape:
                return hit[0]
        if leaf.ndim == 0:
            return replicated(mesh)
        raise ShardingError(f"optimizer state leaf {jax.tree_util.keystr(path)} (shape {leaf.shape}) "
                            f"matches no parameter; cannot choose its sharding")

    opt_sh = jax.tree_util.tree_map_with_path(one, jax.eval_shape(tx.init, abstract))
    return {"params": param_sh, "opt_state": opt_sh, "step": replicated(mesh)}


def abstract_state(cfg, tx, dtype, shardings):
    shapes = jax.eval_shape(functools.partial(init_state, tx=tx), _abstract_params(cfg, dtype))
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
