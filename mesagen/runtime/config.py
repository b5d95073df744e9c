"""Run configuration: YAML -> frozen, validated records (nanoGPT-style config as data, no exec, no globals).

Errors name the file and the dotted field path and are raised as :class:`ConfigError`; the CLI turns them
into one line on stderr and exit status 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from mesagen.data import DynamicsConfig
from mesagen.errors import MesagenError


class ConfigError(MesagenError):
    """A run config file is invalid (message: ``file: field: reason``)."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BlockConfig(_Frozen):
    """One block's sequence layer.

    Attributes:
        layer: ``softmax``, ``generated:NAME`` (``generated/NAME/layer_jax.py``) or a ``.py`` path
            (absolute, or relative to the repository root).
        heads, d_k, d_v: override the model-level sizes for this block.
        form: which ``FORMS`` entry of a generated module to run (default: its first, ``recurrent``).
        spec_sha256: if set, the generated module's ``SPEC_SHA256`` must match.
        backend: ``jax`` (``layer_jax.py``) or ``numba_cpu`` (``layer_numba_cpu.py`` beside it, forward and
            backward on the CPU through host callbacks; recurrent form only).
    """

    layer: str
    heads: int | None = Field(None, ge=1)
    d_k: int | None = Field(None, ge=1)
    d_v: int | None = Field(None, ge=1)
    form: str | None = None
    spec_sha256: str | None = None
    backend: Literal["jax", "numba_cpu"] = "jax"

    @field_validator("layer")
    @classmethod
    def _kind(cls, v: str) -> str:
        if v != "softmax" and not v.startswith("generated:") and not v.endswith(".py"):
            raise ValueError("expected 'softmax', 'generated:NAME' or a path to a .py file")
        return v


class ModelConfig(_Frozen):
    """Model architecture (paper Table 1).

    Attributes:
        tokens: ``constructed`` (``[0, s_t, s_t, s_{t-1}]``, read-out from the first D entries, no embedding)
            or ``standard`` (``s_t`` through a learned embedding and output projection).
        d_model: residual width (40; must be 4 D for constructed tokens).
        heads, d_k, d_v: default per-block sizes (``d_v`` defaults to ``d_k``).
        blocks: the layer of every block, in order; a bare string is shorthand for ``{layer: ...}``.
        layernorm: pre-LN blocks and a final LayerNorm.
        mlp: a GELU MLP (``mlp_ratio`` x wider) after every layer.
        clip_activations: clip the residual stream to ``[-c, c]`` after every block (4 in the paper's
            linear models); null for none.
        init_std: std of the Gaussian initialisation of all weight matrices.
        pos_dim: sinusoidal positional features concatenated to the first block's query/key input (0 = none).
    """

    tokens: Literal["constructed", "standard"]
    d_model: int = Field(40, ge=1)
    heads: int = Field(4, ge=1)
    d_k: int = Field(20, ge=1)
    d_v: int | None = Field(None, ge=1)
    blocks: tuple[BlockConfig, ...] = Field(min_length=1)
    layernorm: bool = False
    mlp: bool = False
    mlp_ratio: int = Field(4, ge=1)
    clip_activations: float | None = Field(None, gt=0.0)
    init_std: float = Field(gt=0.0)
    pos_dim: int = Field(0, ge=0)

    @field_validator("blocks", mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return tuple({"layer": b} if isinstance(b, str) else b for b in v)
        return v


class ScheduleConfig(_Frozen):
    """Learning-rate schedule: ``constant`` at ``peak_lr``, or linear warm-up to ``peak_lr`` over
    ``warmup_steps`` then cosine decay to ``end_lr`` at ``decay_steps`` (default: the run's ``steps``)."""

    kind: Literal["constant", "warmup_cosine"] = "constant"
    peak_lr: float = Field(gt=0.0)
    warmup_steps: int = Field(0, ge=0)
    end_lr: float = Field(0.0, ge=0.0)
    decay_steps: int | None = Field(None, ge=1)


class TrainConfig(_Frozen):
    """Optimisation (AdamW; paper Table 1) and bookkeeping.

    Attributes:
        steps: total optimiser steps; batch_size: sequences per step; seed: model-init and data seed.
        weight_decay: decoupled weight decay on weight matrices (not on spec parameters or LayerNorm).
        clip_grad_norm: global-norm gradient clipping (null = none).
        log_every, eval_every, checkpoint_every: intervals in steps (the last step always does all three).
        progress: show a tqdm progress bar.
    """

    steps: int = Field(ge=1)
    batch_size: int = Field(256, ge=1)
    seed: int = 0
    schedule: ScheduleConfig
    weight_decay: float = Field(0.0, ge=0.0)
    clip_grad_norm: float | None = Field(None, gt=0.0)
    log_every: int = Field(50, ge=1)
    eval_every: int = Field(500, ge=1)
    checkpoint_every: int = Field(500, ge=1)
    progress: bool = True


class EvalConfig(_Frozen):
    """Held-out evaluation: ``batch`` sequences from ``seed`` (shared by model and baselines), and
    ``tune_batch`` other sequences (``seed + 1``) on which the baselines' eta / lambda are line-searched."""

    batch: int = Field(1024, ge=1)
    tune_batch: int = Field(512, ge=1)
    seed: int = 1_000_003


class RunConfig(_Frozen):
    """A whole run: task, model, training and evaluation."""

    name: str = "run"
    description: str = ""
    task: DynamicsConfig = DynamicsConfig()
    model: ModelConfig
    train: TrainConfig
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _consistent(self) -> "RunConfig":
        if self.model.tokens == "constructed" and self.model.d_model != 4 * self.task.observed_dim:
            raise ValueError(f"model.d_model must be 4 * state dim = {4 * self.task.observed_dim} for "
                             f"constructed tokens, got {self.model.d_model}")
        sched = self.train.schedule
        decay = sched.decay_steps or self.train.steps
        if sched.kind == "warmup_cosine" and decay <= sched.warmup_steps:
            raise ValueError(f"train.schedule.warmup_steps ({sched.warmup_steps}) must be below the schedule length "
                             f"(train.schedule.decay_steps or train.steps = {decay}); lower warmup_steps or "
                             "train longer")
        return self

    def with_overrides(self, *, steps: int | None = None, seed: int | None = None) -> "RunConfig":
        """Return a copy with ``train.steps`` / ``train.seed`` replaced (CLI ``--steps`` / ``--seed``).

        Raises:
            ConfigError: the overridden config is inconsistent (e.g. fewer steps than warm-up steps).
        """
        train = self.train.model_copy(update={k: v for k, v in (("steps", steps), ("seed", seed)) if v is not None})
        try:
            return RunConfig.model_validate({**self.model_dump(), "train": train.model_dump()})
        except ValidationError as exc:
            raise ConfigError(f"with --steps {steps} / --seed {seed}: {_format(exc)}") from None


def _format(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "<root>"
        parts.append(f"{field}: {e['msg']}")
    return "; ".join(parts)


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a run config (YAML, safe loading).

    Args:
        path: the YAML file.

    Returns:
        The frozen :class:`RunConfig`.

    Raises:
        ConfigError: if the file is missing, is not YAML, or fails validation (message names file and field).
    """
    path = Path(path)
    try:
        data = YAML(typ="safe", pure=True).load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    except YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: <root>: expected a mapping")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {_format(exc)}") from exc


def dump_config(config: RunConfig, path: str | Path) -> None:
    """Write ``config`` as YAML (the run folder's ``config.yaml``, read back by ``--resume``)."""
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    with open(path, "w", encoding="utf-8") as fh:
        yaml.dump(config.model_dump(mode="json"), fh)
