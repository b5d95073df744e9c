"""Training loop: one jitted AdamW step, periodic held-out evaluation, checkpoints, metrics and figures.

Keys: ``PRNGKey(train.seed)`` is split once into a model-init key and a data key; the batch of step s is drawn
from ``fold_in(data_key, s)``, so every step gets its own key and a resumed run sees exactly the batches an
uninterrupted one would. The held-out set comes from ``PRNGKey(eval.seed)`` and the baselines' tuning set from
``PRNGKey(eval.seed + 1)``, both independent of training.

Run folder: ``config.yaml`` (the resolved config), ``layers.json`` (spec hashes of generated layers),
``metrics.jsonl``, ``checkpoint.eqx``, ``baselines.json``, ``eval.json`` and PNG figures.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from mesagen.data import constructed_tokens, raw_tokens, sample_states
from mesagen.runtime.config import RunConfig, ScheduleConfig, TrainConfig, dump_config
from mesagen.runtime.layers import GeneratedAttention
from mesagen.runtime.model import Model


def make_schedule(s: ScheduleConfig, steps: int) -> optax.Schedule:
    """Constant, or linear warm-up then cosine decay to ``end_lr`` (paper Table 1)."""
    if s.kind == "constant":
        return optax.constant_schedule(s.peak_lr)
    return optax.warmup_cosine_decay_schedule(0.0, s.peak_lr, s.warmup_steps, s.decay_steps or steps, s.end_lr)


def make_optimizer(t: TrainConfig) -> optax.GradientTransformation:
    """AdamW with the configured schedule, decoupled weight decay on weight matrices only (ndim >= 2, not
    spec parameters, biases or LayerNorm), and optional global-norm clipping applied first."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    adamw = optax.adamw(make_schedule(t.schedule, t.steps), weight_decay=t.weight_decay, mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(t.clip_grad_norm), adamw) if t.clip_grad_norm else adamw


def batch_from_states(config: RunConfig, states: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Tokens and targets for the configured token type: ``((B, T, 4D or D), (B, T, D))``."""
    return constructed_tokens(states) if config.model.tokens == "constructed" else raw_tokens(states)


def paper_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
    """``0.5 * sum_d (pred - target)^2``, mean over batch and positions (the paper's unit); float32 scalar."""
    return 0.5 * jnp.mean(jnp.sum((pred - target) ** 2, axis=-1))


def layer_hashes(model: Model) -> dict[str, str]:
    """``{"block_i": SPEC_SHA256}`` of every generated layer in ``model``."""
    return {f"block_{i}": b.attn.layer.SPEC_SHA256 for i, b in enumerate(model.blocks)
            if isinstance(b.attn, GeneratedAttention)}


@dataclass
class TrainState:
    """Everything a checkpoint holds: model, optimiser state, next step and the data key."""

    model: Model
    opt_state: optax.OptState
    step: int
    data_key: jax.Array


class Trainer:
    """Owns the jitted step, the evaluation set and the run folder of one run.

    Attributes:
        config: the run config. optimizer: the optax transformation. traces: how often the step was traced
            (stays 1 across a run: the step never recompiles).
    """

    def __init__(self, config: RunConfig, layer_sha256: dict[str, str] | None = None) -> None:
        """Build model template, optimiser and evaluation data.

        Args:
            config: the run config.
            layer_sha256: expected spec hashes per block (on resume), checked against the loaded modules.

        Raises:
            LayerLoadError: if a generated layer is missing, stale or of another codegen format.
        """
        self.config, self.traces = config, 0
        self.optimizer = make_optimizer(config.train)
        init_key, self._data_key = jax.random.split(jax.random.PRNGKey(config.train.seed))
        self._init_key = init_key
        eval_states = sample_states(jax.random.PRNGKey(config.eval.seed), config.task, config.eval.batch)
        self.eval_states = np.asarray(eval_states)
        self.eval_tokens, self.eval_targets = batch_from_states(config, eval_states)
        self._step = eqx.filter_jit(self._step_impl)
        self._predict = eqx.filter_jit(lambda m, x: m(x))
        if layer_sha256:
            from mesagen.runtime.loader import LayerLoadError
            found = layer_hashes(self.initial_state().model)
            if found != layer_sha256:
                raise LayerLoadError(f"generated layers changed since the checkpoint: {layer_sha256} -> {found}")

    def initial_state(self) -> TrainState:
        """Fresh model and optimiser state at step 0."""
        model = Model(self.config.model, self.config.task.observed_dim, key=self._init_key)
        return TrainState(model, self.optimizer.init(eqx.filter(model, eqx.is_inexact_array)), 0, self._data_key)

    def _step_impl(self, model, opt_state, step, data_key):
        self.traces += 1                                    # runs at trace time only
        states = sample_states(jax.random.fold_in(data_key, step), self.config.task, self.config.train.batch_size)
        tokens, targets = batch_from_states(self.config, states)
        loss, grads = eqx.filter_value_and_grad(lambda m: paper_loss(m(tokens), targets))(model)
        updates, opt_state = self.optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    def step(self, state: TrainState) -> tuple[TrainState, jax.Array]:
        """One optimiser step on a fresh batch; returns the new state and the (device) training loss."""
        model, opt_state, loss = self._step(state.model, state.opt_state, jnp.asarray(state.step, jnp.int32),
                                             state.data_key)
        return TrainState(model, opt_state, state.step + 1, state.data_key), loss

    def evaluate(self, model: Model) -> np.ndarray:
        """Per-position held-out loss, float64 ``(T,)`` (position t has t context pairs)."""
        pred = np.asarray(self._predict(model, self.eval_tokens), np.float64)
        err = pred - np.asarray(self.eval_targets, np.float64)
        return 0.5 * np.mean(np.sum(err ** 2, -1), 0)

    # -- checkpoints ------------------------------------------------------------------------------------
    def save(self, state: TrainState, path: Path) -> None:
        """Serialise model, optimiser state, step and data key (atomically: temp file + rename)."""
        tmp = path.with_suffix(".tmp")
        eqx.tree_serialise_leaves(tmp, (state.model, state.opt_state, np.asarray(state.step, np.int64),
                                        jax.random.key_data(state.data_key)))
        os.replace(tmp, path)

    def load(self, path: Path) -> TrainState:
        """Inverse of :meth:`save` into this trainer's template."""
        t = self.initial_state()
        model, opt, step, key = eqx.tree_deserialise_leaves(
            path, (t.model, t.opt_state, np.asarray(0, np.int64), jax.random.key_data(t.data_key)))
        return TrainState(model, opt, int(step), jax.random.wrap_key_data(key) if _typed(t.data_key) else key)


def _typed(key: jax.Array) -> bool:
    return jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)


def _append(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def read_metrics(run_dir: Path) -> list[dict]:
    """All records of ``run_dir/metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def train(config: RunConfig, run_dir: str | Path, *, resume: bool = False, stop_at: int | None = None) -> TrainState:
    """Train (or resume) a run and write its folder.

    Args:
        config: the run config (on resume: the one stored in the folder).
        run_dir: the run folder (created if needed).
        resume: continue from ``run_dir/checkpoint.eqx``; metrics after the checkpoint are dropped so the
            log matches an uninterrupted run.
        stop_at: stop after this step (for tests of interruption); defaults to ``train.steps``.

    Returns:
        The final :class:`TrainState`.

    Raises:
        FileNotFoundError: on resume without a checkpoint. LayerLoadError: on a missing / stale layer.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt, metrics = run_dir / "checkpoint.eqx", run_dir / "metrics.jsonl"
    tc = config.train
    if resume:
        trainer = Trainer(config, json.loads((run_dir / "layers.json").read_text()))
        state = trainer.load(ckpt)
        kept = [r for r in read_metrics(run_dir) if r["step"] <= state.step]
        metrics.write_text("".join(json.dumps(r) + "\n" for r in kept))
        side = json.loads(ckpt.with_suffix(".json").read_text())
        losses = [jnp.float32(v) for v in side["pending_losses"]]
    else:
        trainer = Trainer(config)
        state = trainer.initial_state()
        dump_config(config, run_dir / "config.yaml")
        (run_dir / "layers.json").write_text(json.dumps(layer_hashes(state.model), indent=1) + "\n")
        metrics.write_text("")
        losses = []
    schedule = make_schedule(tc.schedule, tc.steps)
    end = min(stop_at or tc.steps, tc.steps)
    bar = tqdm(total=tc.steps, initial=state.step, disable=not tc.progress, desc=config.name, dynamic_ncols=True)
    while state.step < end:
        state, loss = trainer.step(state)
        losses.append(loss)
        s, last = state.step, state.step == tc.steps
        if s % tc.log_every == 0 or last:
            mean = float(jnp.mean(jnp.stack(losses)))
            losses = []
            _append(metrics, {"step": s, "train_loss": mean, "lr": float(schedule(s - 1))})
            bar.set_postfix(loss=f"{mean:.4f}")
        if s % tc.eval_every == 0 or last:
            per_t = trainer.evaluate(state.model)
            _append(metrics, {"step": s, "eval_loss": float(per_t.mean()), "eval_per_t": per_t.tolist()})
        if s % tc.checkpoint_every == 0 or last or s == end:
            trainer.save(state, ckpt)   # + the losses of the unfinished logging window, so resumed logs match
            ckpt.with_suffix(".json").write_text(json.dumps(
                {"step": s, "pending_losses": [float(v) for v in losses]}) + "\n")
        bar.update(1)
    bar.close()
    if state.step == tc.steps:
        from mesagen.runtime.evaluate import write_evaluation
        write_evaluation(run_dir, trainer, state.model)
    return state
