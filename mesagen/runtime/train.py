"""Training loop: one jitted AdamW step, periodic held-out evaluation, checkpoints, metrics and figures.

Keys: ``PRNGKey(train.seed)`` is split once into a model-init key and a data key; the batch of step s is drawn
from ``fold_in(data_key, s)``, so every step gets its own key and a resumed run sees exactly the batches an
uninterrupted one would. The held-out set comes from ``PRNGKey(eval.seed)`` and the baselines' tuning set from
``PRNGKey(eval.seed + 1)``, both independent of training.

Run folder: ``config.yaml`` (the resolved config), ``layers.json`` (spec hashes of generated layers),
``metrics.jsonl``, ``checkpoint.eqx``, ``baselines.json``, ``eval.json`` and PNG figures.

``checkpoint.eqx`` is one file, replaced atomically: a magic line, a JSON header (step, the losses of the
unfinished logging window, wall time so far) and the equinox leaves of model, optimiser state, step and data
key. ``metrics.jsonl`` starts with a ``"event": "start"`` record (model description, layer spec hashes and
files, batch, mesagen and jax versions, initial parameters); training records carry ``wall_s`` (training
time so far), ``steps_per_s`` and ``tokens_per_s`` of the logging window (the first window includes
compilation); evaluation records carry the learned layer parameters in constrained space.

Text task (``task.kind: text``, :mod:`mesagen.data.text`): batches are windows of a byte corpus drawn on the
host from ``numpy.random.default_rng([train.seed, step])`` (also a pure function of the step), the loss is the
mean next-byte cross-entropy in nats; evaluation records add bits per byte, perplexity and the in-context-
learning score, and ``corpus.json`` records the corpus (source, Python version for the default corpus, files,
bytes, sha256). ``train.precision: bfloat16`` runs the model in mixed precision
(:class:`mesagen.runtime.model.Model`).

Data parallelism (:mod:`mesagen.runtime.parallel`): the step shards its batch over a one-axis mesh of
``train.devices`` devices (default all) with model and optimiser state replicated; the start record and the
checkpoint header record the devices and the mesh. In multi-process runs only process 0 writes files.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from mesagen import __version__
from mesagen.data import (VOCAB_SIZE, CorpusError, TextData, bits_per_byte, constructed_tokens, icl_score,
                          raw_tokens, sample_states)
from mesagen.errors import MesagenError
from mesagen.runtime import parallel
from mesagen.runtime.config import RunConfig, ScheduleConfig, TrainConfig, dump_config
from mesagen.runtime.layers import GeneratedAttention
from mesagen.runtime.model import Model, check_param_names


def make_schedule(s: ScheduleConfig, steps: int) -> optax.Schedule:
    """Constant, or linear warm-up then cosine decay to ``end_lr`` (paper Table 1)."""
    if s.kind == "constant":
        return optax.constant_schedule(s.peak_lr)
    return optax.warmup_cosine_decay_schedule(0.0, s.peak_lr, s.warmup_steps, s.decay_steps or steps, s.end_lr)


def spec_param_mask(name: str):
    """A mask function for ``optax.masked``: True at the raw (unconstrained) value of spec parameter ``name``
    of every generated layer (``GeneratedAttention.raw_params[name]``), False at every other leaf."""

    def hit(path) -> bool:
        return any(isinstance(a, jax.tree_util.GetAttrKey) and a.name == "raw_params"
                   and isinstance(b, jax.tree_util.DictKey) and b.key == name for a, b in zip(path, path[1:]))

    return lambda params: jax.tree_util.tree_map_with_path(lambda path, _: hit(path), params)


def make_optimizer(t: TrainConfig) -> optax.GradientTransformation:
    """AdamW with the configured schedule, decoupled weight decay on weight matrices only (ndim >= 2, not
    spec parameters, biases or LayerNorm), and optional global-norm clipping applied first; then, per entry of
    ``train.param_lr_scale``, the update of that spec parameter multiplied by its factor (``optax.masked`` of
    ``optax.scale``: the parameter's learning rate is the schedule's times the factor). Without
    ``param_lr_scale`` the transformation (and its state, hence the checkpoint format) is exactly AdamW."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    adamw = optax.adamw(make_schedule(t.schedule, t.steps), weight_decay=t.weight_decay, mask=decay_mask)
    parts = [optax.clip_by_global_norm(t.clip_grad_norm)] if t.clip_grad_norm else []
    parts.append(adamw)
    parts += [optax.masked(optax.scale(factor), spec_param_mask(name))
              for name, factor in sorted(t.param_lr_scale.items())]
    return optax.chain(*parts) if len(parts) > 1 else adamw


def batch_from_states(config: RunConfig, states: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Tokens and targets for the configured token type: ``((B, T, 4D or D), (B, T, D))``."""
    return constructed_tokens(states) if config.model.tokens == "constructed" else raw_tokens(states)


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token next-byte cross-entropy in nats: ``logits (..., 256)`` float, ``targets (...)`` int ->
    ``(...)`` float32 (``-log softmax(logits)[target]``, computed in float32)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def compute_dtype(t: TrainConfig):
    """The model's compute dtype for ``train.precision``: None (float32, as the parameters) or ``jnp.bfloat16``."""
    return jnp.bfloat16 if t.precision == "bfloat16" else None


def model_out_dim(config: RunConfig) -> int:
    """The model's output size: 256 (bytes) for the text task, else the task's observed state dimension D."""
    return VOCAB_SIZE if config.is_text else config.task.observed_dim


def text_metrics(per_t: np.ndarray) -> dict:
    """``eval_loss`` (nats per byte), ``eval_bpb`` (bits per byte), ``eval_ppl`` (per-byte perplexity,
    exp(loss)) and ``eval_icl`` (:func:`mesagen.data.icl_score`, nats) of a per-position loss curve ``(T,)``."""
    loss = float(np.mean(per_t))
    return {"eval_loss": loss, "eval_bpb": bits_per_byte(loss), "eval_ppl": float(np.exp(loss)),
            "eval_icl": icl_score(per_t)}


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
            (stays 1 across a run: the step never recompiles). mesh: the data-parallel device mesh.
    """

    def __init__(self, config: RunConfig, layer_sha256: dict[str, str] | None = None) -> None:
        """Build model template, optimiser and evaluation data.

        Args:
            config: the run config.
            layer_sha256: expected spec hashes per block (on resume), checked against the loaded modules.

        Raises:
            LayerLoadError: if a generated layer is missing, stale or of another codegen format.
            DeviceConfigError: ``train.devices`` exceeds the devices JAX sees, or ``train.batch_size`` is not a
                multiple of the device count.
        """
        self.config, self.traces = config, 0
        self.mesh = parallel.make_mesh(config.train.devices)
        parallel.check_batch(self.mesh, config.train.batch_size)
        self._rep, self._shard = parallel.replicated(self.mesh), parallel.batch_sharding(self.mesh)
        self.optimizer = make_optimizer(config.train)
        init_key, self._data_key = jax.random.split(jax.random.PRNGKey(config.train.seed))
        self._init_key = init_key
        self.dtype = compute_dtype(config.train)
        self.data: TextData | None = None
        if config.is_text:
            self.data = TextData(config.task)           # CorpusError: missing / empty / too small corpus
            windows = self.data.valid_batch(config.eval.batch)
            self.eval_states = None
            self.eval_tokens, self.eval_targets = windows[:, :-1], windows[:, 1:]
        else:
            eval_states = sample_states(jax.random.PRNGKey(config.eval.seed), config.task, config.eval.batch)
            self.eval_states = np.asarray(eval_states)
            self.eval_tokens, self.eval_targets = batch_from_states(config, eval_states)
        n_eval = self.eval_tokens.shape[0]
        eval_sharding = self._shard if n_eval % self.mesh.shape[parallel.DATA_AXIS] == 0 else self._rep
        self.eval_tokens = parallel.place(self.eval_tokens, eval_sharding)
        self._step = eqx.filter_jit(self._text_step_impl if config.is_text else self._step_impl)
        # predictions gathered to every device, so every process can read them (multi-host)
        self._predict = eqx.filter_jit(lambda m, x: parallel.constrain(m(x, self.dtype), self._rep))
        self._token_loss = eqx.filter_jit(
            lambda m, x, y: parallel.constrain(cross_entropy(m(x, self.dtype), y), self._rep))
        if layer_sha256:
            from mesagen.runtime.loader import LayerLoadError
            found = layer_hashes(self.initial_state().model)
            if found != layer_sha256:
                raise LayerLoadError(f"generated layers changed since the checkpoint: {layer_sha256} -> {found}")

    def initial_state(self) -> TrainState:
        """Fresh model and optimiser state at step 0, replicated over the mesh.

        Raises:
            LayerLoadError: a layer cannot be loaded, or ``model.param_space`` / ``model.param_init`` /
                ``train.param_lr_scale`` names a parameter no generated layer of the model has.
        """
        model = Model(self.config.model, model_out_dim(self.config), key=self._init_key)
        check_param_names(model, self.config.train.param_lr_scale, "train.param_lr_scale")
        return self.place(TrainState(model, self.optimizer.init(eqx.filter(model, eqx.is_inexact_array)), 0,
                                     self._data_key))

    def place(self, state: TrainState) -> TrainState:
        """``state`` with model, optimiser state and data key replicated over this trainer's mesh (whatever
        layout they came from: a checkpoint, another mesh, one device)."""
        model, opt, key = parallel.place((state.model, state.opt_state, state.data_key), self._rep)
        return TrainState(model, opt, state.step, key)

    def layout(self) -> dict:
        """The devices and mesh of this trainer (:func:`mesagen.runtime.parallel.describe`)."""
        return parallel.describe(self.mesh)

    def _step_impl(self, model, opt_state, step, data_key):
        self.traces += 1                                    # runs at trace time only
        states = sample_states(jax.random.fold_in(data_key, step), self.config.task, self.config.train.batch_size)
        states = jax.lax.with_sharding_constraint(states, self._shard)      # data parallel: batch over "data"
        tokens, targets = batch_from_states(self.config, states)
        loss, grads = eqx.filter_value_and_grad(lambda m: paper_loss(m(tokens, self.dtype), targets))(model)
        updates, opt_state = self.optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
        model, opt_state = parallel.constrain((eqx.apply_updates(model, updates), opt_state), self._rep)
        return model, opt_state, loss

    def _text_step_impl(self, model, opt_state, window):
        self.traces += 1                                    # runs at trace time only
        window = jax.lax.with_sharding_constraint(window, self._shard)
        tokens, targets = window[:, :-1], window[:, 1:]
        loss, grads = eqx.filter_value_and_grad(
            lambda m: jnp.mean(cross_entropy(m(tokens, self.dtype), targets)))(model)
        updates, opt_state = self.optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
        model, opt_state = parallel.constrain((eqx.apply_updates(model, updates), opt_state), self._rep)
        return model, opt_state, loss

    def step(self, state: TrainState) -> tuple[TrainState, jax.Array]:
        """One optimiser step on a fresh batch; returns the new state and the (device) training loss."""
        if self.data is not None:
            window = self.data.train_batch(self.config.train.seed, state.step, self.config.train.batch_size)
            model, opt_state, loss = self._step(state.model, state.opt_state, parallel.place(window, self._shard))
        else:
            model, opt_state, loss = self._step(state.model, state.opt_state, jnp.asarray(state.step, jnp.int32),
                                                 state.data_key)
        return TrainState(model, opt_state, state.step + 1, state.data_key), loss

    def evaluate(self, model: Model) -> np.ndarray:
        """Per-position held-out loss, float64 ``(T,)``: position t has t context pairs (dynamics; 0.5 x
        squared error) or t bytes of context (text; next-byte cross-entropy in nats), mean over the held-out
        sequences."""
        if self.data is not None:
            ce = self._token_loss(model, self.eval_tokens, jnp.asarray(self.eval_targets))
            return np.asarray(ce, np.float64).mean(0)
        pred = np.asarray(self._predict(model, self.eval_tokens), np.float64)
        err = pred - np.asarray(self.eval_targets, np.float64)
        return 0.5 * np.mean(np.sum(err ** 2, -1), 0)

    # -- checkpoints ------------------------------------------------------------------------------------
    def save(self, state: TrainState, path: Path, header: dict | None = None) -> None:
        """Write one checkpoint file atomically: a JSON header line, then model, optimiser state, step and data
        key (equinox leaves, as host arrays: independent of the device layout) -- into ``PATH.tmp``, fsynced,
        then renamed over ``path``. A kill at any moment leaves either the old or the new checkpoint, never a
        mix. In a multi-process run only process 0 writes (the state is replicated).

        Args:
            state: what to save. path: the checkpoint file (``run_dir/checkpoint.eqx``).
            header: JSON-serialisable bookkeeping stored with it (``step`` is always added).
        """
        if jax.process_index() != 0:
            return
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:
            fh.write(CHECKPOINT_MAGIC)
            fh.write(json.dumps({**(header or {}), "step": state.step}).encode() + b"\n")
            eqx.tree_serialise_leaves(fh, (state.model, state.opt_state, np.asarray(state.step, np.int64),
                                           jax.random.key_data(state.data_key)))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)

    def load(self, path: Path) -> TrainState:
        """Inverse of :meth:`save` into this trainer's template (:func:`read_checkpoint_header` reads the header),
        placed on this trainer's mesh: a checkpoint written on any device layout loads on any other.

        Raises:
            CheckpointError: if the file is not a mesagen checkpoint of this format.
        """
        t = self.initial_state()
        with open(path, "rb") as fh:
            _read_header(fh, path)
            model, opt, step, key = eqx.tree_deserialise_leaves(
                fh, (t.model, t.opt_state, np.asarray(0, np.int64), jax.random.key_data(t.data_key)))
        key = jax.random.wrap_key_data(np.asarray(key)) if _typed(t.data_key) else key
        return self.place(TrainState(model, opt, int(step), key))


#: First line of every checkpoint file (format 1: this line, one JSON header line, then equinox leaves).
CHECKPOINT_MAGIC = b"mesagen-checkpoint 1\n"

#: Files mesagen writes into a run folder: ``--overwrite`` replaces these and never touches anything else.
RUN_FILES = ("config.yaml", "layers.json", "metrics.jsonl", "checkpoint.eqx", "checkpoint.eqx.tmp",
             "checkpoint.json", "checkpoint.tmp", "baselines.json", "eval.json", "per_t.png", "training.png",
             "corpus.json")


class CheckpointError(MesagenError):
    """A checkpoint file is missing, truncated or not in this mesagen's format."""


class RunExistsError(MesagenError):
    """The run folder already holds a run and neither resuming nor overwriting was asked for."""


class TrainingInterrupted(MesagenError):
    """SIGINT / SIGTERM stopped training after a checkpoint was saved.

    Attributes:
        signum: the signal received. step: the step saved. run_dir: the run folder.
    """

    def __init__(self, signum: int, step: int, run_dir: Path) -> None:
        self.signum, self.step, self.run_dir = signum, step, Path(run_dir)
        name = signal.Signals(signum).name
        super().__init__(f"{name} received: stopped after step {step} and saved the checkpoint; resume with: "
                         f"mesagen train --resume {shlex.quote(str(run_dir))}")


def _read_header(fh, path: Path) -> dict:
    if fh.read(len(CHECKPOINT_MAGIC)) != CHECKPOINT_MAGIC:
        raise CheckpointError(f"{path}: not a mesagen checkpoint (format 1); it was written by another mesagen "
                              "version or is damaged -- retrain with --overwrite")
    try:
        return json.loads(fh.readline())
    except ValueError as exc:
        raise CheckpointError(f"{path}: damaged checkpoint header: {exc}") from None


def read_checkpoint_header(path: str | Path) -> dict:
    """The JSON header of a checkpoint (``step``, ``pending_losses``, ``wall_s``, ...).

    Raises:
        CheckpointError: if the file is not a mesagen checkpoint. FileNotFoundError: if it does not exist.
    """
    with open(path, "rb") as fh:
        return _read_header(fh, Path(path))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _typed(key: jax.Array) -> bool:
    return jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)


def _append(path: Path, record: dict) -> None:
    if jax.process_index() != 0:        # multi-process: process 0 writes the run folder
        return
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def read_metrics(run_dir: Path) -> list[dict]:
    """All records of ``run_dir/metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def model_param_count(model: Model) -> int:
    """Number of trainable scalars of ``model`` (every inexact array leaf)."""
    return int(sum(x.size for x in jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))))


def learned_params(model: Model) -> dict[str, dict[str, list[float]]]:
    """``{"block_i": {name: [per-head values]}}``: every generated layer's spec parameters in constrained
    space (e.g. the mesa layer's ridge coefficient λ per head, as the layer uses it)."""
    return {f"block_{i}": {n: np.asarray(v, np.float64).tolist() for n, v in b.attn.params().items()}
            for i, b in enumerate(model.blocks) if isinstance(b.attn, GeneratedAttention)}


def describe_model(config: RunConfig) -> str:
    """One line naming the model: depth and each block's layer kind (form, backend), e.g.
    ``1 layer: generated:ridge (recurrent); constructed tokens``."""
    blocks = []
    for b in config.model.blocks:
        extra = [x for x in (b.form, b.backend if b.backend != "jax" else None) if x]
        blocks.append(b.layer + (f" ({', '.join(extra)})" if extra else ""))
    n = len(blocks)
    return f"{n} layer{'s' if n > 1 else ''}: {' -> '.join(blocks)}; {config.model.tokens} tokens"


def layer_provenance(model: Model) -> dict[str, dict]:
    """Per generated block: spec name, spec sha256, module file, form (what produced the layer)."""
    out = {}
    for i, b in enumerate(model.blocks):
        if isinstance(b.attn, GeneratedAttention):
            layer = b.attn.layer
            out[f"block_{i}"] = {"spec_name": layer.SPEC_NAME, "spec_sha256": layer.SPEC_SHA256,
                                 "module": str(getattr(layer, "__file__", "") or ""), "form": b.attn.form}
    return out


class _StopOnSignal:
    """Within the block, the first SIGINT / SIGTERM only sets :attr:`signum` (the loop then saves and stops);
    handlers are restored on exit and after the first signal, so a second Ctrl-C interrupts at once. Outside
    the main thread signals cannot be caught and nothing is installed."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        self.signum = signum
        self._restore()

    def _restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}

    def __enter__(self) -> "_StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            self._old = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        self._restore()


def _clear_run_folder(run_dir: Path) -> list[str]:
    """Delete the files of :data:`RUN_FILES` in ``run_dir`` (nothing else); returns the names deleted."""
    removed = []
    for name in RUN_FILES:
        p = run_dir / name
        if p.is_file() or p.is_symlink():
            p.unlink()
            removed.append(name)
    return removed


def holds_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds (part of) a mesagen run: a checkpoint, metrics or a stored config."""
    return any((Path(run_dir) / n).exists() for n in ("checkpoint.eqx", "metrics.jsonl", "layers.json"))


def train(config: RunConfig, run_dir: str | Path, *, resume: bool = False, stop_at: int | None = None,
          overwrite: bool = False, log=print) -> TrainState:
    """Train (or resume) a run and write its folder.

    Everything is validated before the folder is touched: the config, every layer module (loaded and
    checked) and the model (built once). A folder that already holds a run is refused unless ``overwrite``;
    overwriting deletes only the files mesagen writes (:data:`RUN_FILES`), never other files in the folder.
    SIGINT / SIGTERM during training save a checkpoint and raise :class:`TrainingInterrupted`, whose message
    is the exact resume command.

    Args:
        config: the run config (on resume: the one stored in the folder).
        run_dir: the run folder (created if needed).
        resume: continue from ``run_dir/checkpoint.eqx``; metrics after the checkpoint are dropped so the
            log matches an uninterrupted run.
        stop_at: stop after this step (for tests of interruption); defaults to ``train.steps``.
        overwrite: replace the run already in ``run_dir``.
        log: where one-line notices go (default ``print``).

    Returns:
        The final :class:`TrainState`.

    Raises:
        CheckpointError: on resume without a valid checkpoint. LayerLoadError: on a missing / stale layer.
        RunExistsError: the folder holds a run and neither ``resume`` nor ``overwrite`` is set.
        TrainingInterrupted: after SIGINT / SIGTERM (the checkpoint is saved first).
        DeviceConfigError: ``train.devices`` / ``train.batch_size`` do not fit the devices JAX sees.
    """
    run_dir = Path(run_dir)
    ckpt, metrics = run_dir / "checkpoint.eqx", run_dir / "metrics.jsonl"
    tc = config.train
    primary = jax.process_index() == 0          # multi-process runs: only process 0 writes the run folder
    if resume:
        if not ckpt.is_file():
            raise CheckpointError(f"{run_dir}: no checkpoint.eqx to resume from")
        header = read_checkpoint_header(ckpt)
        trainer = Trainer(config, json.loads((run_dir / "layers.json").read_text()))
        if trainer.data is not None and (run_dir / "corpus.json").is_file():
            stored = json.loads((run_dir / "corpus.json").read_text())
            if stored.get("sha256") != trainer.data.corpus.record.get("sha256") or \
                    stored.get("bytes") != trainer.data.corpus.record.get("bytes"):
                raise CorpusError(f"{run_dir}: the corpus changed since the run started ({stored.get('bytes')} "
                                  f"bytes, sha256 {stored.get('sha256')} -> {trainer.data.corpus.record.get('bytes')} "
                                  f"bytes, sha256 {trainer.data.corpus.record.get('sha256')}); the default corpus "
                                  "depends on the Python version. Retrain with --overwrite")
        state = trainer.load(ckpt)
        kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= state.step]
        if primary:
            metrics.write_text("".join(json.dumps(r) + "\n" for r in kept))
        losses = [jnp.float32(v) for v in header["pending_losses"]]
        wall = float(header.get("wall_s", 0.0))
    else:
        trainer = Trainer(config)
        state = trainer.initial_state()          # loads and checks every layer, builds the model
        existing = holds_run(run_dir)
        if jax.process_count() > 1:               # every process has looked before process 0 writes
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("mesagen: run folder checked")
        if existing:
            if not overwrite:
                raise RunExistsError(f"{run_dir} already holds a run; use --resume {run_dir}, --overwrite or "
                                     "another --out")
            removed = _clear_run_folder(run_dir) if primary else []
            kept = sorted(p.name for p in run_dir.iterdir())
            log(f"overwriting the run in {run_dir}: replaced {', '.join(removed) or 'nothing'}"
                + (f"; kept files mesagen did not write: {', '.join(kept)}" if kept else ""))
        if primary:
            run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(config, run_dir / "config.yaml")
            (run_dir / "layers.json").write_text(json.dumps(layer_hashes(state.model), indent=1) + "\n")
            metrics.write_text("")
            if trainer.data is not None:
                (run_dir / "corpus.json").write_text(json.dumps(trainer.data.corpus.record, indent=1) + "\n")
        extra = {} if trainer.data is None else {"corpus": trainer.data.corpus.record,
                                                 "eval_sequences": int(trainer.eval_tokens.shape[0])}
        _append(metrics, {"step": 0, "event": "start", "model": describe_model(config),
                          "layers": layer_provenance(state.model), "batch_size": tc.batch_size, **trainer.layout(),
                          "seq_len": config.task.seq_len, "precision": tc.precision, **extra,
                          "mesagen_version": __version__, "jax_version": jax.__version__,
                          "params": learned_params(state.model)})
        losses, wall = [], 0.0
    schedule = make_schedule(tc.schedule, tc.steps)
    end = min(stop_at or tc.steps, tc.steps)
    tokens_per_step = tc.batch_size * config.task.seq_len
    bar = tqdm(total=tc.steps, initial=state.step, disable=not tc.progress or not primary, desc=config.name, dynamic_ncols=True)
    loop_start, wall_before = time.perf_counter(), wall
    window_t, window_steps = loop_start, 0

    def checkpoint() -> None:
        # + the losses of the unfinished logging window, so resumed logs match
        trainer.save(state, ckpt, {"pending_losses": [float(v) for v in losses], "wall_s": wall,
                                   "mesagen_version": __version__, "mesh": trainer.layout()["mesh"]})

    with _StopOnSignal() as stop:
        while state.step < end:
            state, loss = trainer.step(state)
            losses.append(loss)
            s, last = state.step, state.step == tc.steps
            window_steps += 1
            if s % tc.log_every == 0 or last:
                mean = float(jnp.mean(jnp.stack(losses)))      # waits for the step: timings below are real
                now = time.perf_counter()
                wall = wall_before + now - loop_start
                rate = window_steps / max(now - window_t, 1e-9)
                _append(metrics, {"step": s, "train_loss": mean, "lr": float(schedule(s - 1)),
                                  "wall_s": wall, "steps_per_s": rate, "tokens_per_s": rate * tokens_per_step})
                losses, window_t, window_steps = [], now, 0
                bar.set_postfix(loss=f"{mean:.4f}")
            if s % tc.eval_every == 0 or last:
                per_t = trainer.evaluate(state.model)
                scores = text_metrics(per_t) if trainer.data is not None else {"eval_loss": float(per_t.mean())}
                _append(metrics, {"step": s, **scores, "eval_per_t": per_t.tolist(),
                                  "params": learned_params(state.model)})
            if s % tc.checkpoint_every == 0 or last or s == end:
                wall = wall_before + time.perf_counter() - loop_start
                checkpoint()
            bar.update(1)
            if stop.signum is not None:
                if not (s % tc.checkpoint_every == 0 or last or s == end):
                    wall = wall_before + time.perf_counter() - loop_start
                    checkpoint()
                bar.close()
                raise TrainingInterrupted(stop.signum, s, run_dir)
    bar.close()
    wall = wall_before + time.perf_counter() - loop_start
    if state.step == tc.steps:
        from mesagen.runtime.evaluate import write_evaluation
        if primary:
            write_evaluation(run_dir, trainer, state.model, steps=state.step, wall_s=wall)
        else:
            trainer.evaluate(state.model)          # the same collective computation as process 0's evaluation
    return state
