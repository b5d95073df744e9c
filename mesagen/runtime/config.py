"""Run configuration: YAML -> frozen, validated records (nanoGPT-style config as data, no exec, no globals).

Errors name the file, line, column and dotted field path (``file:line:col: field: reason``); every mistake of
a file is reported at once, one line each, in one :class:`ConfigError`; the CLI prints the lines on stderr
and exits with status 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator,
                      model_validator)
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import YAMLError

from mesagen.data import DynamicsConfig, TextConfig
from mesagen.errors import MesagenError


class ConfigError(MesagenError):
    """A run config file is invalid.

    Attributes:
        lines: one ``file:line:col: field: reason`` line per mistake (the message joins them with newlines).
    """

    def __init__(self, lines: str | list[str]) -> None:
        self.lines = [lines] if isinstance(lines, str) else list(lines)
        super().__init__("\n".join(self.lines))


#: A finite float (no nan / inf), for values keyed by spec parameter name.
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
#: A finite float > 0.
PositiveFloat = Annotated[float, Field(gt=0.0, allow_inf_nan=False)]


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
        scale: the query scale passed to a v2 module (``forward(..., scale=)``, fla's meaning: q is multiplied
            by it after the feature map); null (default) means the spec's ``DEFAULT_SCALE``. v1 modules (no
            ``DEFAULT_SCALE``) take no scale: setting it for one is an error when the model is built.
        qk_norm: ``none`` (default) or ``l2``: the wrapper divides every head's query and key by their L2
            norm (eps 1e-6) before the layer -- for a spec whose feature map is the identity (the mesa layer
            ``ridge``) this is the L2-normalised q/k of gated DeltaNet, applied in the trainer instead of the
            spec; generated layers only (softmax attention takes none).
    """

    layer: str
    heads: int | None = Field(None, ge=1)
    d_k: int | None = Field(None, ge=1)
    d_v: int | None = Field(None, ge=1)
    form: str | None = None
    spec_sha256: str | None = None
    backend: Literal["jax", "numba_cpu"] = "jax"
    scale: float | None = Field(None, gt=0.0)
    qk_norm: Literal["none", "l2"] = "none"

    @field_validator("layer")
    @classmethod
    def _kind(cls, v: str) -> str:
        if v != "softmax" and not v.startswith("generated:") and not v.endswith(".py"):
            raise ValueError("expected 'softmax', 'generated:NAME' or a path to a .py file")
        return v

    @model_validator(mode="after")
    def _softmax_norm(self) -> "BlockConfig":
        if self.layer == "softmax" and self.qk_norm != "none":
            raise ValueError("qk_norm: softmax attention takes no qk_norm (generated layers only)")
        return self


class ModelConfig(_Frozen):
    """Model architecture (paper Table 1).

    Attributes:
        tokens: ``constructed`` (``[0, s_t, s_t, s_{t-1}]``, read-out from the first D entries, no embedding),
            ``standard`` (``s_t`` through a learned embedding and output projection) or ``bytes`` (the text
            task: byte ids through a learned ``(256, d_model)`` embedding table, logits over the 256 bytes).
        tie_embeddings: ``bytes`` tokens only: the output projection is the embedding table's transpose (plus a
            learned bias) instead of a separate ``(d_model, 256)`` matrix.
        d_model: residual width (40; must be 4 D for constructed tokens).
        heads, d_k, d_v: default per-block sizes (``d_v`` defaults to ``d_k``).
        blocks: the layer of every block, in order; a bare string is shorthand for ``{layer: ...}``.
        layernorm: pre-LN blocks and a final LayerNorm.
        mlp: a GELU MLP (``mlp_ratio`` x wider) after every layer.
        clip_activations: clip the residual stream to ``[-c, c]`` after every block (4 in the paper's
            linear models); null for none.
        init_std: std of the Gaussian initialisation of all weight matrices.
        pos_dim: sinusoidal positional features concatenated to the first block's query/key input (0 = none).
        positive_space: how every ``positive`` spec parameter (the mesa layer's λ, linear attention's η) is
            stored for the optimiser: ``log`` (raw = log λ, λ = exp(raw); the default) or ``softplus``
            (λ = softplus(raw), the only map before this setting existed; run folders whose ``config.yaml``
            lacks the key are read as ``softplus``, see :func:`load_config`).
        param_space: per-parameter override by spec parameter name, e.g. ``{lam: softplus}``; applies to that
            parameter in every block having it; a name no block's layer has, or a parameter that is not
            positive, is an error when the model is built.
        param_init: initial value of a spec parameter by name, in constrained space (the value the layer sees,
            every head), replacing the spec's ``init``: e.g. ``{lam: 0.01}`` starts the mesa layer's ridge
            coefficient at 0.01 instead of 1. Applies to that parameter in every block having it; a name no
            block's layer has, or a value outside the parameter's domain (λ ≤ 0), is an error when the model
            is built. Default: none (every parameter starts at its spec's ``init``).
    """

    tokens: Literal["constructed", "standard", "bytes"]
    tie_embeddings: bool = False
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
    positive_space: Literal["log", "softplus"] = "log"
    param_space: dict[str, Literal["log", "softplus"]] = Field(default_factory=dict)
    param_init: dict[str, FiniteFloat] = Field(default_factory=dict)

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
        devices: how many devices the batch is sharded over (data parallelism on a one-axis
            ``jax.sharding.Mesh``, parameters replicated; :mod:`mesagen.runtime.parallel`): the first N of
            ``jax.devices()``; null (default) means all of them. ``batch_size`` (and ``eval.batch``) must be a
            multiple of the device count. Losses equal the 1-device run's to float32 round-off.
        param_lr_scale: learning-rate multiplier of a spec parameter by name (its raw, unconstrained value),
            e.g. ``{lam: 30}``: that parameter's AdamW update is multiplied by the factor (``optax.masked``
            ``optax.scale`` after AdamW), i.e. it follows the schedule times the factor. Applies in every block
            having the parameter; a name no generated layer of the model has is an error when the model is
            built. Default: none (every parameter at the schedule's rate). Why: with Adam a raw value moves
            at most about the summed learning rate, ≈ 0.31 over the mesa configs' schedule, far less than the
            ln(1000) ≈ 6.9 that λ needs from 1 to 1e-3 (docs/paper.md §5).
        precision: ``float32`` (default) or ``bfloat16``: mixed precision -- embeddings, projections, MLPs and
            the read-out compute in bfloat16 from float32 master parameters; LayerNorm, softmax, the loss, the
            residual stream and every generated layer stay float32 (docs/lm.md, "Precision").
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
    devices: int | None = Field(None, ge=1)
    param_lr_scale: dict[str, PositiveFloat] = Field(default_factory=dict)
    precision: Literal["float32", "bfloat16"] = "float32"


class EvalConfig(_Frozen):
    """Held-out evaluation: ``batch`` sequences from ``seed`` (shared by model and baselines), and
    ``tune_batch`` other sequences (``seed + 1``) on which the baselines' eta / lambda are line-searched."""

    batch: int = Field(1024, ge=1)
    tune_batch: int = Field(512, ge=1)
    seed: int = 1_000_003


def _task_tag(v: Any) -> str:
    kind = v.get("kind") if isinstance(v, dict) else getattr(v, "kind", None)
    return "text" if kind == "text" else "dynamics"


#: ``task:`` -- a dynamics task (paper tasks; ``kind`` omitted means ``fully_observed``) or ``{kind: text}``.
TaskConfig = Annotated[Union[Annotated[DynamicsConfig, Tag("dynamics")], Annotated[TextConfig, Tag("text")]],
                       Discriminator(_task_tag)]


class RunConfig(_Frozen):
    """A whole run: task (:class:`~mesagen.data.DynamicsConfig` or :class:`~mesagen.data.TextConfig`, chosen
    by ``task.kind``), model, training and evaluation."""

    name: str = "run"
    description: str = ""
    task: TaskConfig = DynamicsConfig()
    model: ModelConfig
    train: TrainConfig
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _consistent(self) -> "RunConfig":
        # Every cross-field problem, one "dotted.field: reason" line each (``_format`` splits and locates them).
        problems = []
        text = isinstance(self.task, TextConfig)
        if text and self.model.tokens != "bytes":
            problems.append(f"model.tokens: the text task needs tokens: bytes, got {self.model.tokens!r}")
        if not text and self.model.tokens == "bytes":
            problems.append("model.tokens: bytes tokens need the text task (task: {kind: text, ...})")
        if self.model.tie_embeddings and self.model.tokens != "bytes":
            problems.append("model.tie_embeddings: only bytes tokens have an embedding table to tie")
        if not text and self.model.tokens == "constructed" and self.model.d_model != 4 * self.task.observed_dim:
            problems.append(f"model.d_model: must be 4 * state dim = {4 * self.task.observed_dim} for "
                            f"constructed tokens, got {self.model.d_model}")
        sched = self.train.schedule
        decay = sched.decay_steps or self.train.steps
        if sched.kind == "warmup_cosine" and decay <= sched.warmup_steps:
            problems.append(f"train.schedule.warmup_steps: {sched.warmup_steps} must be below the schedule length "
                            f"(train.schedule.decay_steps or train.steps = {decay}); lower warmup_steps, train "
                            "longer, or pass --steps (which rescales the warm-up)")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def is_text(self) -> bool:
        """Whether the task is byte-level language modelling (``task.kind: text``)."""
        return isinstance(self.task, TextConfig)

    def with_overrides(self, *, steps: int | None = None, seed: int | None = None,
                       text: str | None = None) -> "RunConfig":
        """Return a copy with ``train.steps`` / ``train.seed`` / ``task.corpus`` replaced (CLI ``--steps`` /
        ``--seed`` / ``--text``).

        A new ``steps`` rescales a ``warmup_cosine`` schedule with it: ``warmup_steps`` and ``decay_steps``
        (if set) are multiplied by ``steps / train.steps`` and rounded (warm-up kept below the run length),
        so the schedule keeps its shape -- the way the shipped configs were scaled from the paper's -- and
        ``--steps 10`` is a valid smoke test of any config. :meth:`schedule_change` describes the change.

        Args:
            steps: new ``train.steps`` (>= 1), or None to keep it.
            seed: new ``train.seed``, or None to keep it.

        Raises:
            ConfigError: the overridden config is invalid (e.g. ``steps`` < 1), or ``text`` is given for a config
                whose task is not ``text``.
        """
        config = self
        if text is not None:
            if not self.is_text:
                raise ConfigError(f"--text {text}: the config's task is {self.task.kind!r}; --text needs a config "
                                  "with task: {kind: text, ...} (e.g. configs/lm_softmax.yaml)")
            config = self.model_copy(update={"task": self.task.model_copy(update={"corpus": str(text)})})
            if steps is None and seed is None:
                return config
        return config._with_train(steps=steps, seed=seed)

    def _with_train(self, *, steps: int | None, seed: int | None) -> "RunConfig":
        update: dict[str, Any] = {"seed": seed} if seed is not None else {}
        if steps is not None and steps != self.train.steps:
            update["steps"] = steps
            sched = self.train.schedule
            if sched.kind == "warmup_cosine" and steps >= 1:
                ratio = steps / self.train.steps
                decay = max(1, round(sched.decay_steps * ratio)) if sched.decay_steps else None
                warm = min(round(sched.warmup_steps * ratio), (decay or steps) - 1)
                update["schedule"] = sched.model_copy(update={"warmup_steps": max(0, warm), "decay_steps": decay})
        try:
            train = TrainConfig.model_validate({**self.train.model_dump(), **update})
            return RunConfig.model_validate({**self.model_dump(), "train": train.model_dump()})
        except ValidationError as exc:
            given = " / ".join(f"--{n} {v}" for n, v in (("steps", steps), ("seed", seed)) if v is not None)
            raise ConfigError([f"{given}: {line}" for line in _format(exc)]) from None

    def schedule_change(self, other: "RunConfig") -> str | None:
        """One line describing how ``other``'s learning-rate schedule differs from this one's, or None."""
        a, b = self.train.schedule, other.train.schedule
        if a == b:
            return None
        parts = [f"{f} {getattr(a, f)} -> {getattr(b, f)}" for f in ("warmup_steps", "decay_steps")
                 if getattr(a, f) != getattr(b, f)]
        return (f"train.steps {self.train.steps} -> {other.train.steps}: schedule scaled in proportion "
                f"({', '.join(parts)})")


def _dotted(loc: tuple) -> str:
    out = ""
    for key in loc:
        out += f"[{key}]" if isinstance(key, int) else ("." if out else "") + str(key)
    return out or "<root>"


def _reason(e: dict) -> str:
    if e["type"] == "extra_forbidden":
        return f"unknown key {e['loc'][-1]!r}"
    if e["type"] == "missing":
        return "required field is missing"
    msg = e["msg"].removeprefix("Value error, ")
    if "input" in e and not isinstance(e["input"], (dict, list, tuple)):
        msg += f" (got {e['input']!r})"
    return msg


def _format(err: ValidationError, root: Any = None) -> list[str]:
    """One ``line:col: field: reason`` (``field: reason`` without a ruamel tree) per pydantic error."""
    errors = err.errors(include_url=False)
    lines = []
    for e in errors:
        loc = tuple(e["loc"])
        if loc[:1] == ("task",) and loc[1:2] in (("dynamics",), ("text",)):
            loc = loc[:1] + loc[2:]                     # drop the discriminated union's tag
        if e["type"] == "too_short" and any(tuple(o["loc"][:len(loc)]) == loc and o is not e for o in errors):
            continue  # pydantic's follow-up of an invalid item ("at least 1 item after validation, not 0")
        if not loc and e["type"] == "value_error":      # RunConfig._consistent: "dotted.field: reason" lines
            for problem in _reason(e).split("\n"):
                field, _, reason = problem.partition(": ")
                at = tuple(field.split("."))
                lines.append(f"{_locate(root, at)}{field}: {reason}")
            continue
        lines.append(f"{_locate(root, loc)}{_dotted(loc)}: {_reason(e)}")
    return lines


def _locate(root: Any, loc: tuple) -> str:
    """``"line:col: "`` of the deepest node along ``loc`` in a ruamel round-trip tree (1-based), or ``""``."""
    if not isinstance(root, (CommentedMap, CommentedSeq)) or root.lc.line is None:
        return ""
    line, col, node = root.lc.line, root.lc.col, root
    for key in loc:
        if isinstance(node, CommentedMap) and key in node and key in node.lc.data:
            line, col = node.lc.key(key)
        elif isinstance(node, CommentedSeq) and isinstance(key, int) and 0 <= key < len(node) and node.lc.data:
            line, col = node.lc.item(key)
        else:
            break
        node = node[key]
    return f"{line + 1}:{col + 1}: "


def _plain(node: Any) -> Any:
    """ruamel round-trip containers and scalars -> plain dict / list / str / int / float / bool / None."""
    if isinstance(node, dict):
        return {str(k) if not isinstance(k, (int, float, bool)) else k: _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    for kind in (bool, int, float, str):
        if isinstance(node, kind):
            return kind(node)
    return node


#: What a run folder's ``config.yaml`` written before a model setting existed means by its absence.
STORED_DEFAULTS = {"positive_space": "softplus"}


def load_config(path: str | Path, *, stored: bool = False) -> RunConfig:
    """Read and validate a run config (YAML, ruamel round-trip loading: positions kept, no Python objects).

    Args:
        path: the YAML file.
        stored: the file is a run folder's ``config.yaml`` (``--resume``, ``eval``): model settings added
            after it was written take the value that reproduces the run (:data:`STORED_DEFAULTS`; e.g. a
            config without ``model.positive_space`` trained λ through softplus), not today's default.

    Returns:
        The frozen :class:`RunConfig`.

    Raises:
        ConfigError: if the file is missing, is not YAML, or fails validation; every validation error of the
            file is one ``file:line:col: field: reason`` line of :attr:`ConfigError.lines`.
    """
    path = Path(path)
    try:
        root = YAML(typ="rt", pure=True).load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    except YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{mark.line + 1}:{mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}:{where}<root>: not valid YAML: {problem}") from exc
    if not isinstance(root, dict):
        raise ConfigError(f"{path}: <root>: expected a mapping")
    if stored and isinstance(root.get("model"), dict):
        for key, value in STORED_DEFAULTS.items():
            if key not in root["model"]:
                root["model"][key] = value
    try:
        return RunConfig.model_validate(_plain(root))
    except ValidationError as exc:
        raise ConfigError([f"{path}:{line}" for line in _format(exc, root)]) from exc


def dump_config(config: RunConfig, path: str | Path) -> None:
    """Write ``config`` as YAML (the run folder's ``config.yaml``, read back by ``--resume``)."""
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    with open(path, "w", encoding="utf-8") as fh:
        yaml.dump(config.model_dump(mode="json"), fh)
