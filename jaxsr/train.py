"""SFT and DPO: jitted train steps, the optimizer, and a checkpointed loop that resumes exactly.

The train state is a plain pytree {"params", "opt_state", "step"} that Orbax saves as is. A step is
`train_step(state, batch, rng) -> (state, metrics)`: the gradient of the whole batch (a `lax.scan` over its
micro-batches), global-norm clipping and AdamW. The dropout key of step s is fold_in(key(seed), s) and the
order of the data is a function of (seed, epoch), so a run restored from its step-s checkpoint computes
the same steps s+1, s+2, ... as one that never stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from . import data as data_lib
from . import distributed
from .config import DpoSection, SftSection, TrainSection
from .model.config import ModelConfig
from .model.sharding import DEFAULT_RULES, ShardingRules, batch_multiple, batch_sharding, replicated
from .objectives import Objective, dpo_objective, pair_logps, sft_objective, target_logps
from .policy import DTYPES, JAXSR_MODEL_FILE, Policy, load_policy, param_shardings, save_checkpoint
from .train_state import State, abstract_state, init_state, make_optimizer, state_shardings

log = logging.getLogger(__name__)

Batch = dict[str, jax.Array]
# on_checkpoint(step, params) -> "continue" | "stop": called with the params of a committed step checkpoint.
CheckpointHook = Callable[[int, dict], str]


class TrainingDiverged(FloatingPointError):
    """A non-finite loss or gradient norm; the message names the step and the last good checkpoint."""


# --- the step -----------------------------------------------------------------------------------------------

def layer_unroll(cfg: ModelConfig, remat: str = "none") -> int | bool:
    """How the train step unrolls the layer scan: fully for up to 16 layers without rematerialisation, else not.

    A scan stacks every layer's residuals and weight gradients into [L, ...] buffers (zero-filled, then
    written and read slice by slice); unrolled, each layer keeps its own. On CPU that is 12% of a DPO step
    of a 4-layer model and 20% of an 8-layer one. Compile time grows with unrolled depth, so deep models
    keep the scan; and with remat the scan stays too: unrolled, XLA is free to schedule the recomputed
    layers early and the step's peak memory grows back (by ~1.6x for remat=dots in tests/test_plan.py).
    """
    return True if cfg.num_layers <= 16 and remat == "none" else 1


def batch_grads(params, batch: Batch, rng, ref_params, *, loss_fn, normaliser):
    """Gradient of the whole batch's loss and its metrics; micro-batches ([A, ...]) are a lax.scan.

    Each micro-batch loss is already divided by the whole batch's count, so the sum over micro-batches is
    the full-batch mean and grad_accum does not change the result.
    """
    denom = jnp.maximum(normaliser(batch), 1).astype(jnp.float32)
    value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)
    A = jax.tree.leaves(batch)[0].shape[0]

    def micro(i, mb):
        r = None if rng is None else jax.random.fold_in(rng, i)
        (_, metrics), grads = value_and_grad(params, mb, r, denom, ref_params)
        # Accumulate in float32 even for bfloat16 parameters.
        return jax.tree.map(lambda g: g.astype(jnp.float32), grads), metrics

    if A == 1:
        grads, metrics = micro(0, jax.tree.map(lambda x: x[0], batch))
    else:
        def body(carry, xs):
            i, mb = xs
            return jax.tree.map(jnp.add, carry, micro(i, mb)), None

        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                             jax.eval_shape(micro, 0, jax.tree.map(lambda x: x[0], batch)))
        (grads, metrics), _ = jax.lax.scan(body, zeros, (jnp.arange(A), batch))
    return jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params), metrics


def _train_step(state: State, batch: Batch, rng, ref_params, *, grads_fn, tx, schedule, dropout: bool):
    step = state["step"]
    step_rng = jax.random.fold_in(rng, step) if dropout else None
    grads, metrics = grads_fn(state["params"], batch, step_rng, ref_params)
    grad_norm = optax.tree.norm(grads)  # before clipping, as TRL logs it
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = metrics | {"grad_norm": grad_norm, "learning_rate": schedule(step)}
    return {"params": params, "opt_state": opt_state, "step": step + 1}, metrics


def make_step_fns(objective: Objective, cfg: ModelConfig, mesh, tx, schedule, *, dtype=jnp.float32,
                  remat: str = "none", rules: ShardingRules = DEFAULT_RULES, param_dtype=None, unroll=None,
                  attention: str = "xla"):
    """(jitted train_step(state, batch, rng, ref_params), the pure grads function it uses, state shardings).

    unroll: the layer scan's unrolling (None: `layer_unroll`; plan_compile unrolls to cost every layer).
    attention: xla, splash, cudnn or auto (jaxsr/model/attention_kernels.py)."""
    fwd = functools.partial(target_logps, cfg=cfg, dtype=dtype, dropout_rate=objective.section.dropout, remat=remat,
                            mesh=mesh, unroll=layer_unroll(cfg, remat) if unroll is None else unroll,
                            attention=attention)
    grads_fn = functools.partial(batch_grads, loss_fn=functools.partial(objective.loss, fwd=fwd),
                                 normaliser=objective.normaliser)
    state_sh = state_shardings(cfg, mesh, tx, param_dtype or dtype, rules)
    on_the_fly = objective.reference == "on_the_fly"
    step = jax.jit(
        functools.partial(_train_step, grads_fn=grads_fn, tx=tx, schedule=schedule,
                          dropout=objective.section.dropout > 0),
        # state: params and optimizer state FSDP x tensor, step replicated; donated so the update is in place.
        # batch: micro-batch axis whole on every device, rows split over data x fsdp.
        # rng: the run's base key, replicated (the step folds in its own number).
        # ref_params: the frozen reference (reference=on_the_fly), sharded like params; never donated.
        in_shardings=(state_sh, batch_sharding(mesh, rules=rules, micro_axis=True), replicated(mesh),
                      param_shardings(cfg, mesh, rules) if on_the_fly else None),
        out_shardings=(state_sh, replicated(mesh)),  # metrics are scalars
        donate_argnames=("state",),
    )
    return step, grads_fn, state_sh


@functools.lru_cache(maxsize=8)
def _step_for(objective: Objective, cfg, mesh, total_steps, dtype, remat, rules, param_dtype, attention):
    """(optimizer, jitted step, state shardings), shared by runs whose steps compile to the same program (objectives
    compare by their step fields)."""
    tx, schedule = make_optimizer(objective.section, total_steps)
    step, _, state_sh = make_step_fns(objective, cfg, mesh, tx, schedule, dtype=dtype, remat=remat, rules=rules,
                                      param_dtype=param_dtype, attention=attention)
    return tx, step, state_sh


def to_device(batch: dict[str, np.ndarray], sharding) -> Batch:
    # Every process builds the same global batch on the host (a pure function of the plan and the data);
    # each process transfers only the rows of its own devices.
    return {k: distributed.global_array(v, sharding) for k, v in batch.items()}


# --- reference log-probs ------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def _reference_fn(cfg: ModelConfig, mesh, dtype: str, rules: ShardingRules, attention: str = "xla"):
    fwd = functools.partial(target_logps, cfg=cfg, dtype=DTYPES[dtype], mesh=mesh, unroll=layer_unroll(cfg),
                            attention=attention)

    def logps(params, rows):
        return pair_logps(fwd, params, rows, None)[0]

    # params keep their shardings; pair rows over data x fsdp; the [b, 2] result comes back replicated.
    return jax.jit(logps, in_shardings=(param_shardings(cfg, mesh, rules), batch_sharding(mesh, rules=rules)),
                   out_shardings=replicated(mesh))


def reference_logps(policy: Policy, pairs: Sequence[dict], *, max_length: int = 1024, overlong: str = "truncate",
                    batch_size: int = 16, shared_prompt: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Summed log-probs of each pair's chosen and rejected response under `policy` (pi_ref = M_t).

    Computed once per iteration and stored with the pairs as `ref_chosen_logps` / `ref_rejected_logps`, so
    DPO holds one model. Tokenisation, truncation and row layout are the trainer's (use the same
    max_length/overlong/shared_prompt: the other layout gives the same numbers up to float rounding).
    Returns two float32 arrays aligned with `pairs`; NaN where the trainer would skip the pair.
    """
    toks, _ = data_lib.tokenize_pairs(policy.tokenizer, pairs, max_length=max_length, overlong=overlong,
                                      where="reference log-probs")
    policy = policy.for_compute()
    fn = _reference_fn(policy.config, policy.mesh, policy.dtype, policy.rules, policy.attention)
    m, rows_sh = batch_multiple(policy.mesh), batch_sharding(policy.mesh, rules=policy.rules)
    keys = ("ids", "positions", "mask", "target_pos", "target_ids", "target_mask") + (("branch",) if shared_prompt else ())
    out = np.full((len(pairs), 2), np.nan, np.float32)
    order = sorted(range(len(toks)), key=lambda i: toks[i].length)  # similar lengths share a bucket
    for start in range(0, len(order), batch_size):
        rows = [[i] for i in order[start:start + batch_size]]
        b = data_lib.pair_batch(toks, rows, batch_size=batch_size, multiple=m, max_length=max_length,
                                pad_id=policy.pad_token_id, shared_prompt=shared_prompt)
        host = {k: b[k][0] for k in keys}
        dev = {k: distributed.global_array(v, rows_sh) for k, v in host.items()}
        logps = distributed.to_host(fn(policy.params, dev))  # replicated: every process holds all of it
        for j, row in enumerate(rows):
            out[toks[row[0]].index] = logps[j]
    return out[:, 0], out[:, 1]


# --- the checkpointed loop ----------------------------------------------------------------------------------

class _MetricsFile:
    """metrics.jsonl: one line per step, each written with a single append so a crash never tears a line."""

    def __init__(self, path: Path, keep_upto: int):
        self.path = path
        self.write_ok = distributed.is_primary()
        if not self.write_ok:
            return
        kept = []
        if path.is_file():  # drop steps a killed run logged after its last checkpoint (they will rerun)
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= keep_upto:
                        kept.append(line + "\n")
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)

    def write(self, row: dict) -> None:
        if not self.write_ok:
            return
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(row) + "\n").encode())
        finally:
            os.close(fd)


# Meta keys a resumed run must share with the checkpoint it resumes.
_RUN_KEYS = ("stage", "seed", "total_steps", "batch_size", "grad_accum", "num_items", "data_fingerprint", "packing")


def _hook_steps(n: int, total: int, hook_every: int) -> bool:
    """Whether the checkpoint hook runs after step n: every `hook_every` steps and after the last one."""
    return hook_every > 0 and (n % hook_every == 0 or n == total)


def _call_hook(on_checkpoint: CheckpointHook, n: int, params, stage: str) -> bool:
    """Runs the hook; True when it asks to stop."""
    answer = on_checkpoint(n, params)
    if answer not in ("continue", "stop"):
        raise ValueError(f"{stage}: on_checkpoint returned {answer!r} at step {n}; expected 'continue' or 'stop'")
    return answer == "stop"


def _run(objective: Objective, policy: Policy, items, work_dir, *, mesh, log_fn, remat, compute_dtype,
         ref_params=None, on_checkpoint: CheckpointHook | None = None, hook_every: int = 0) -> Policy:
    stage, section = objective.name, objective.section
    plan = _plan(items, section, objective.packing)
    make_batch = objective.batches(items, multiple=batch_multiple(mesh), pad_id=policy.pad_token_id)
    work_dir = Path(work_dir).absolute()
    steps_dir, final_dir = work_dir / "steps", work_dir / "final"
    fp = data_lib.fingerprint(items)
    run_meta = {"stage": stage, "seed": section.seed, "total_steps": plan.total_steps, "batch_size": section.batch_size,
                "grad_accum": section.grad_accum, "num_items": len(items), "data_fingerprint": fp,
                "packing": bool(plan.pack_capacity)}
    if (final_dir / JAXSR_MODEL_FILE).is_file():
        done = json.loads((final_dir / JAXSR_MODEL_FILE).read_text()).get("extra", {})
        _check_same_run(done, run_meta, final_dir)
        log.info("%s: %s already holds the final model of this run; loading it", stage, final_dir)
        return dataclasses.replace(load_policy(final_dir, dtype=policy.dtype, param_dtype=policy.param_dtype, mesh=mesh,
                                               rules=policy.rules), decode_tensor=policy.decode_tensor,
                                   attention=policy.attention)
    if final_dir.exists() and distributed.is_primary():
        shutil.rmtree(final_dir)  # a final save cut short; it is redone from the last step checkpoint
    distributed.barrier(f"{stage}: clear {final_dir}")

    cfg, rules = policy.config, policy.rules
    # Parameters and AdamW state are updated in the policy's storage dtype; the forward runs in the compute dtype.
    dtype, param_dtype = DTYPES[compute_dtype or policy.dtype], DTYPES[policy.param_dtype]
    if policy.param_dtype == "bfloat16":
        _warn_bfloat16_storage(stage, section.lr)
    total = plan.total_steps
    tx, train_step, state_sh = _step_for(objective, cfg, mesh, total, dtype, remat, rules, param_dtype,
                                         policy.attention)
    opts = ocp.CheckpointManagerOptions(max_to_keep=section.keep_checkpoints, create=True,
                                        enable_async_checkpointing=True)
    mngr = ocp.CheckpointManager(steps_dir, options=opts)
    start = mngr.latest_step() or 0
    if start:
        restored = mngr.restore(start, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state(cfg, tx, param_dtype, state_sh)),
            meta=ocp.args.JsonRestore()))
        _check_same_run(restored.meta, run_meta, steps_dir / str(start))
        state = restored.state
        log.info("%s: resumed from %s (step %d of %d)", stage, steps_dir / str(start), start, total)
    else:
        # A copy of the parameters: the state is donated to every step, the caller's policy must survive.
        # params in with their shardings (not donated); the state comes out on the step's shardings.
        init = jax.jit(lambda p: init_state(jax.tree.map(jnp.copy, p), tx),
                       in_shardings=(state_sh["params"],), out_shardings=state_sh)
        params = policy.params if mesh is policy.mesh else jax.device_put(policy.params, state_sh["params"])
        state = init(params)
    metrics_file = _MetricsFile(work_dir / "metrics.jsonl", keep_upto=start)
    rng = jax.random.key(section.seed)
    b_sharding = batch_sharding(mesh, rules=rules, micro_axis=True)

    def prepare(s):
        host = make_batch(plan.rows(s))
        return to_device(host, b_sharding), data_lib.num_tokens(host), plan.locate(s)[0]

    bar = distributed.progress(total, initial=start, desc=stage, unit="step")
    every = section.checkpoint_every
    hook_every = hook_every if on_checkpoint is not None else 0
    pending = prepare(start) if start < total else None
    t_last = time.perf_counter()
    end = total
    try:
        # A run resumed at a hook step asks the hook again: a kill may have come between the save and the hook's
        # answer, and a hook that keeps its decisions (jaxsr.selection) answers as before.
        if start and _hook_steps(start, total, hook_every) and _call_hook(on_checkpoint, start, state["params"], stage):
            end, pending = start, None
        for s in range(start, end):
            batch, ntok, epoch = pending
            state, metrics_dev = train_step(state, batch, rng, ref_params)
            pending = prepare(s + 1) if s + 1 < total else None  # host work overlaps the device step
            metrics = {k: float(v) for k, v in distributed.to_host(metrics_dev).items()}
            now = time.perf_counter()
            metrics["tokens_per_s"], t_last = ntok / max(now - t_last, 1e-9), now
            n = s + 1
            if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
                mngr.wait_until_finished()
                last = mngr.latest_step()
                raise TrainingDiverged(
                    f"{stage}: non-finite loss {metrics['loss']} (grad_norm {metrics['grad_norm']}) at step {n}; "
                    f"its state was not saved; the last good checkpoint is "
                    f"{steps_dir / str(last) if last else 'none (no step checkpoint yet)'}")
            metrics_file.write({"step": n, "epoch": epoch, **metrics})
            if log_fn is not None:
                log_fn(n, metrics)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
            hook = _hook_steps(n, total, hook_every)
            if n % every == 0 or n == total or hook:
                e, k = plan.locate(n) if n < total else (epoch, None)
                meta = run_meta | {"step": n, "epoch": e, "batch_in_epoch": k, "rng": f"fold_in(key({section.seed}), step)"}
                mngr.save(n, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
                if bar.disable:
                    log.info("%s step %d/%d: loss %.4f, %.0f tokens/s", stage, n, total, metrics["loss"],
                             metrics["tokens_per_s"])
            if hook:
                mngr.wait_until_finished()  # the hook sees a committed checkpoint: a resume restarts from it
                if _call_hook(on_checkpoint, n, state["params"], stage):
                    log.info("%s: on_checkpoint stopped training at step %d of %d", stage, n, total)
                    end = n
                    break
    finally:
        bar.close()
        mngr.wait_until_finished()
        mngr.close()
    trained = dataclasses.replace(policy, params=state["params"], mesh=mesh)
    save_checkpoint(trained, final_dir, extra=run_meta | {"steps": end, "stopped_early": end < total})
    log.info("%s: wrote %s after %d steps", stage, final_dir, end)
    return trained


def _warn_bfloat16_storage(stage: str, lr: float) -> None:
    # An AdamW step moves a weight by about lr; bfloat16 keeps 8 significant bits, so half an ulp of w is
    # |w| * 2^-9 to 2^-8 and a smaller step rounds back to w.
    log.warning("%s: model.param_dtype=bfloat16 stores the parameters and AdamW state in bfloat16; an AdamW step of "
                "about lr %g is below half a bfloat16 ulp of every weight larger than about 512 * lr = %.1e in "
                "magnitude (for |w| = 0.01 half an ulp is 3e-5), so those updates round away and the model barely "
                "changes. Use model.param_dtype=float32 (float32 master weights, compute in model.dtype)",
                stage, lr, 512 * lr)


def _check_same_run(meta: dict, want: dict, where: Path) -> None:
    diff = {k: (meta.get(k), want[k]) for k in _RUN_KEYS if meta.get(k) != want[k]}
    if diff:
        listed = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"{where} belongs to a different run ({listed}); resume with the same data and settings "
                         f"or use a new work directory")


def _plan(items, section: TrainSection, packing: bool) -> data_lib.StepPlan:
    return data_lib.StepPlan([it.length for it in items], section.batch_size, section.seed, epochs=section.epochs,
                             max_steps=section.max_steps, pack_capacity=section.max_length if packing else None)


def train_objective(objective: Objective, policy: Policy, records, work_dir, *, mesh=None, log_fn=None,
                    remat: str = "none", compute_dtype: str | None = None,
                    on_checkpoint: CheckpointHook | None = None, hook_every: int = 0) -> Policy:
    """Trains `policy` on `records` for `objective`; resumes from work_dir/steps, final model in work_dir/final.

    With `on_checkpoint` and `hook_every` > 0, a step checkpoint is also saved every `hook_every` steps and after
    the last one, and `on_checkpoint(step, params)` is called once it is committed; "stop" ends training there
    (the final model is that step's params). A run resumed at such a step calls the hook for it again.
    """
    mesh = policy.mesh if mesh is None else mesh
    items = objective.tokenize(policy.tokenizer, list(records))
    ref_params = None
    if objective.reference == "on_the_fly":  # pi_ref = the starting policy, frozen
        ref_params = policy.params if mesh is policy.mesh else jax.device_put(
            policy.params, param_shardings(policy.config, mesh, policy.rules))
    return _run(objective, policy, items, work_dir, mesh=mesh, log_fn=log_fn, remat=remat,
                compute_dtype=compute_dtype, ref_params=ref_params, on_checkpoint=on_checkpoint, hook_every=hook_every)


def train_sft(policy: Policy, examples, section: SftSection, work_dir, *, mesh=None, log_fn=None,
              remat: str = "none", compute_dtype: str | None = None) -> Policy:
    """Supervised fine-tuning on {prompt, response} records (loss on response tokens); resumes from work_dir/steps.

    Returns the trained policy, also saved params-only in work_dir/final.
    """
    return train_objective(sft_objective(section), policy, examples, work_dir, mesh=mesh, log_fn=log_fn,
                           remat=remat, compute_dtype=compute_dtype)


def train_dpo(policy: Policy, pairs, section: DpoSection, work_dir, *, mesh=None, log_fn=None,
              remat: str = "none", compute_dtype: str | None = None,
              on_checkpoint: CheckpointHook | None = None, hook_every: int = 0) -> Policy:
    """DPO on {prompt, chosen, rejected[, ref_*_logps]} records with pi_ref = `policy` (M_t).

    reference="precomputed" reads the pairs' ref log-probs (see `reference_logps`); "on_the_fly" keeps
    `policy`'s parameters as a frozen reference. Resumes from work_dir/steps; final model in work_dir/final.
    `on_checkpoint` / `hook_every`: see `train_objective` (checkpoint selection, jaxsr.selection).
    """
    return train_objective(dpo_objective(section), policy, pairs, work_dir, mesh=mesh, log_fn=log_fn,
                           remat=remat, compute_dtype=compute_dtype, on_checkpoint=on_checkpoint,
                           hook_every=hook_every)


# --- reference log-probs for pairs read from a file -------------------------------------------------------

def with_reference_logps(policy: Policy, records: list[dict], section: DpoSection, out: Path, source: str) -> list[dict]:
    """Adds pi_ref = M_t log-probs to pairs that lack them, cached in `out` so a resumed run reuses the same numbers."""
    cache = out / "reference_logps.npz"
    if cache.is_file():
        saved = np.load(cache)
        chosen, rejected = saved["chosen"], saved["rejected"]
        if len(chosen) != len(records):
            raise ValueError(f"{cache} holds {len(chosen)} reference log-probs but {source} has {len(records)} pairs; "
                             f"use a new --out directory")
    else:
        log.info("%s has no reference log-probs: computing them once with M_t", source)
        chosen, rejected = reference_logps(policy, records, max_length=section.max_length, overlong=section.overlong,
                                           batch_size=section.batch_size, shared_prompt=section.shared_prompt)
        if distributed.is_primary():
            out.mkdir(parents=True, exist_ok=True)
            tmp = out / "reference_logps.tmp.npz"
            np.savez(tmp, chosen=chosen, rejected=rejected)
            os.replace(tmp, cache)
    return [r | {"ref_chosen_logps": float(c), "ref_rejected_logps": float(x)}
            for r, c, x in zip(records, chosen, rejected)]
