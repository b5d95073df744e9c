"""``mesagen reproduce``: run the experiments behind the paper's claims and write ``PAPER_RESULTS.md``.

    mesagen reproduce [--quick] [--only CLAIM] [--out DIR] [--jobs N]

One row per claim of docs/paper.md §6 (von Oswald et al., arXiv 2309.05858) plus the family comparison: the
paper's statement and value, the measured value, the setting (steps × batch, seed) and a status (pass / fail /
partial / not run), with the figures it cites written beside the table. Runs live in ``DIR/runs/NAME``; a run
folder whose stored config equals the one asked for and whose training finished (``eval.json`` written, the
checkpoint at the last step) is reused, not retrained. ``--quick`` uses tiny budgets (the table says its numbers
are not meaningful) and skips the most expensive models; the full budgets take about 101 minutes of one CPU core
(:func:`one_core_estimate` of :data:`FULL`). ``--jobs N`` trains the selected claims' runs in N processes side by
side first (:func:`train_runs`; each process uses one core).
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np

from mesagen.runtime import analysis
from mesagen.runtime.config import RunConfig, load_config

#: Where the shipped run configs live (the repository's ``configs/``).
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"

#: Claim ids in table order (docs/paper.md §6, then the family comparison).
CLAIMS = ("1", "2", "3", "4", "5", "6", "7", "8", "9", "family")

#: Where the shipped specs live (every ``specs/NAME.yaml`` is a member of the family comparison).
SPEC_DIR = CONFIG_DIR.parent / "specs"

#: The config every family run is derived from (task, model sizes, optimiser, seed): the mesa layer's.
FAMILY_BASE = "mesa_1layer"


def family_names(spec_dir: Path = SPEC_DIR) -> tuple[str, ...]:
    """The layers of the family comparison: every ``spec_dir/NAME.yaml``, sorted by name."""
    return tuple(sorted(p.stem for p in Path(spec_dir).glob("*.yaml")))


#: Family layers compared at one budget, derived from the directories (:func:`family_names`); the run of layer
#: NAME is ``family_NAME`` (:func:`family_config`).
FAMILY = family_names()


@dataclass(frozen=True)
class Budget:
    """Steps and batch of one run, and the evaluation set size."""

    steps: int
    batch: int
    eval_batch: int = 1024
    tune_batch: int = 512


#: The one budget of every family run (steps × batch; seed, optimiser and schedule those of :data:`FAMILY_BASE`).
FAMILY_BUDGET = Budget(300, 128)

#: Learning-rate scales tried for every family layer: the base config's warm-up + cosine schedule (peak and end
#: learning rate) times each. The base's peak lr 4e-4 is the paper's for 6000 steps; at the family's 300 steps
#: several layers barely move from their initialisation with it (measured: gated_delta 1.45 at ×1, 0.36 at ×10;
#: softmax 1.62 and 0.74), so each layer runs at both scales and the table reports the scale with the lower final
#: *training* loss (:func:`final_train_loss`; every training batch is fresh sequences, disjoint from the held-out
#: set the table scores). Run ``family_NAME`` is scale 1, ``family_NAME@lrS`` scale S.
FAMILY_LR_SCALES = (1.0, 10.0)


def family_run_names(name: str) -> list[str]:
    """The runs of family layer ``name``, one per :data:`FAMILY_LR_SCALES`: ``family_NAME``, ``family_NAME@lr10``."""
    return [f"family_{name}" + ("" if s == 1 else f"@lr{s:g}") for s in FAMILY_LR_SCALES]

#: Budgets per run name. ``full``: about 101 minutes of one CPU core with the family's 28 runs and the LM runs
#: (:func:`one_core_estimate`; measured steps/s on this project's machine, one core, unloaded: linear_1layer 12.7
#: at batch 256, mesa 10.5, linear_2layer 8.1 and linear_6layer 3.8 at batch 128, softmax_7layer 3.2 and the
#: hybrid 7.3 at batch 64, compilation 7-16 s per model): the linear model at its shipped config's budget, the
#: others shorter (early-training snapshots). The mesa model trains 12000 × 128, the paper's number of training
#: sequences (6000 × 256) in 8× the shipped config's steps (≈ 19 more minutes of one core): its per-t gap to ridge
#: at t ≈ D is a training-length effect that shrinks with the number of steps (docs/paper.md §5, "Why t ≈ 10"),
#: and claim 2 asks for ≤ 3× ridge at every t ≥ 10.
FULL = {"linear_1layer": Budget(3000, 256), "mesa_1layer": Budget(12000, 128),
        "linear_2layer": Budget(1000, 128), "linear_4layer": Budget(1000, 128), "linear_6layer": Budget(1000, 128),
        "fixed_teacher": Budget(600, 128), "hybrid_softmax_mesa": Budget(1500, 64),
        "softmax_7layer": Budget(1500, 64), "softmax_3layer": Budget(1500, 64),
        **{r: FAMILY_BUDGET for n in FAMILY for r in family_run_names(n)}}

#: Claim 6's other task families (docs/paper.md §1): run ``NAME@KIND`` is the shipped config ``NAME`` with
#: ``task.kind: KIND`` (:func:`run_config`); the standard-token models at their fully observed budget, the mesa
#: layer on constructed tokens at its shipped config's 1500 × 128 (not the 12000 steps of claim 2).
TASK_FAMILIES = ("partially_observed", "nonlinear")
CLAIM6_MODELS = ("hybrid_softmax_mesa", "softmax_7layer", "mesa_1layer")
FULL.update({f"{m}@{k}": FULL[m] if m != "mesa_1layer" else Budget(1500, 128)
             for m in CLAIM6_MODELS for k in TASK_FAMILIES})
#: Training steps/s of each run's model on one core of this project's 2-core CPU machine (JAX CPU backend, at the
#: batch of :data:`FULL`), and a compile time per model: the one-core cost estimate in the table. Measured (one
#: core, light load) for linear_1layer, linear_2layer, linear_6layer, mesa, softmax_7layer, the hybrid and gla;
#: linear_4layer interpolated between 2 and 6 layers, fixed_teacher taken as linear_1layer's rate at batch 256
#: (it runs at 128: an overestimate of its time), every family run (family_NAME) at gla's rate (not measured per layer
#: unloaded; on the shared 2-core machine at load ~12 the family runs measured 1.3-10.6 steps/s, README).
CPU_STEPS_PER_S = {"linear_1layer": 12.7, "mesa_1layer": 10.5, "linear_2layer": 8.1, "linear_4layer": 5.5,
                   "linear_6layer": 3.8, "fixed_teacher": 12.7, "hybrid_softmax_mesa": 7.3, "softmax_7layer": 3.2,
                   "softmax_3layer": 7.0,
                   **{r: 13.8 for n in FAMILY for r in family_run_names(n)}}
CPU_STEPS_PER_S.update({f"{m}@{k}": CPU_STEPS_PER_S[m] for m in CLAIM6_MODELS for k in TASK_FAMILIES})
CPU_COMPILE_S = 12.0

#: Claim 9: byte-level language models (configs/lm_*.yaml, docs/lm.md) that differ only in the second block:
#: softmax -> softmax, softmax -> mesa (ridge), softmax -> linear attention, at the configs' own budget.
LM_RUNS = ("lm_softmax", "lm_mesa", "lm_linear")
FULL.update({n: Budget(1000, 16, eval_batch=512) for n in LM_RUNS})
#: One-core steps/s of the LM runs: lm_mesa measured at 5.9 (light load); softmax and linear scaled from the
#: README's side-by-side wall times of the same 1000 steps (7.2 and 6.7 against mesa's 10.9 minutes).
CPU_STEPS_PER_S.update({"lm_mesa": 5.9, "lm_softmax": 8.9, "lm_linear": 9.6})


def one_core_estimate(budgets: dict[str, Budget]) -> float:
    """Seconds of training the runs of ``budgets`` take on one core (:data:`CPU_STEPS_PER_S`, compilation
    included; evaluation and the analyses are not)."""
    return sum(b.steps / CPU_STEPS_PER_S.get(n, 5.0) + CPU_COMPILE_S for n, b in budgets.items())


#: ``--quick``: a smoke run of the whole pipeline (numbers not meaningful); the expensive models are skipped.
QUICK = {n: Budget(4, 8, 64, 64) for n in ("linear_1layer", "mesa_1layer", "linear_2layer", "fixed_teacher")}


def family_layer(name: str) -> str:
    """The block ``layer`` of family member ``name``: ``generated:NAME`` (built by ``mesagen build``).

    Raises:
        ValueError: there is no ``specs/NAME.yaml``.
    """
    if not (SPEC_DIR / f"{name}.yaml").is_file():
        raise ValueError(f"family layer {name!r}: no {SPEC_DIR / (name + '.yaml')}")
    return f"generated:{name}"


def family_config(name: str, budget: Budget, lr_scale: float = 1.0) -> RunConfig:
    """Run ``family_NAME``: :data:`FAMILY_BASE` (task, tokens, sizes, clipping, init, optimiser, schedule, seed)
    with its one block swapped for layer ``name`` in the layer's first form (``recurrent`` for every shipped
    spec), at ``budget``; with ``lr_scale`` ≠ 1 the run ``family_NAME@lrS`` (folder ``family_NAME_lrS``), whose
    schedule's peak and end learning rates are the base's times ``lr_scale`` (:data:`FAMILY_LR_SCALES`).

    Per-parameter settings of the base (``model.param_space``, ``model.param_init``, ``train.param_lr_scale``)
    are kept for the parameters the layer has and dropped for the others (the base's ``lam: 100`` applies to
    every layer with a λ: ridge, rls_forgetting, mesanet). Per-token inputs (gates, β) need nothing here: the
    trainer projects them from the block input for any spec (:class:`~mesagen.runtime.layers.GeneratedAttention`).

    Raises:
        ConfigError: the base config is missing or invalid. LayerLoadError: the layer is not built.
        ValueError: ``name`` is not a family layer.
    """
    from mesagen.runtime.loader import load_layer_module, resolve_layer_path
    layer = family_layer(name)
    params = set(load_layer_module(resolve_layer_path(layer)).PARAMS)
    cfg = run_config(FAMILY_BASE, budget).model_dump()
    cfg["name"] = f"family_{name}" + ("" if lr_scale == 1 else f"_lr{lr_scale:g}")
    cfg["description"] = (f"1-layer {name} on the fully observed task at the family budget ({FAMILY_BASE} otherwise"
                          + ("" if lr_scale == 1 else f", learning rate × {lr_scale:g}") + ")")
    if lr_scale != 1:
        sched = cfg["train"]["schedule"]
        sched.update(peak_lr=sched["peak_lr"] * lr_scale, end_lr=sched["end_lr"] * lr_scale)
    cfg["model"]["blocks"] = [{"layer": layer}]
    for section, key in (("model", "param_space"), ("model", "param_init"), ("train", "param_lr_scale")):
        cfg[section][key] = {n: v for n, v in cfg[section][key].items() if n in params}
    return RunConfig.model_validate(cfg)


def run_config(name: str, budget: Budget) -> RunConfig:
    """The shipped config behind run ``name`` at ``budget`` (``fixed_teacher``: linear_1layer on the
    fixed-teacher task; ``family_NAME``: :func:`family_config`); warm-up + cosine schedules are rescaled with the steps (``with_overrides``).

    Raises:
        ConfigError: the config file is missing or invalid.
    """
    if name.startswith("family_"):
        layer, _, scale = name.removeprefix("family_").partition("@lr")
        return family_config(layer, budget, float(scale) if scale else 1.0)
    base_name, _, kind = name.partition("@")
    file = {"fixed_teacher": "linear_1layer", "softmax_3layer": "softmax_7layer"}.get(base_name, base_name)
    base = load_config(CONFIG_DIR / f"{file}.yaml")
    cfg = base.with_overrides(steps=budget.steps).model_dump()
    cfg["name"] = name.replace("@", "_")
    if base_name == "softmax_3layer":       # claim 5: the paper's 3-layer softmax model, else as the 7-layer one
        cfg["model"]["blocks"] = cfg["model"]["blocks"][:3]
        cfg["description"] = "3-layer softmax Transformer, standard tokens"
    if kind:                                # claim 6's other task families: same model, other dynamics
        cfg["task"]["kind"] = kind
        cfg["description"] = f"{base.description}; {kind.replace('_', ' ')} task"
        if cfg["model"]["tokens"] == "constructed":     # constructed tokens are 4 slots of the observed dim
            from mesagen.data import DynamicsConfig
            cfg["model"]["d_model"] = 4 * DynamicsConfig(**cfg["task"]).observed_dim
    if name == "fixed_teacher":
        cfg["task"]["kind"] = "fixed_teacher"
        cfg["description"] = "1-layer linear self-attention on the fixed-teacher task (negative control)"
    n = budget.steps
    cfg["train"].update(batch_size=budget.batch, progress=False, log_every=max(1, min(50, n // 4)),
                        eval_every=n, checkpoint_every=n)
    cfg["eval"].update(batch=budget.eval_batch, tune_batch=budget.tune_batch)
    return RunConfig.model_validate(cfg)


@dataclass
class Run:
    """A trained run: its config, trainer (held-out set), model and ``eval.json``."""

    config: RunConfig
    trainer: object
    model: object
    result: dict
    reused: bool
    run_dir: Path | None = None

    def final_train_loss(self, last: int = 3) -> float:
        """Mean of the last ``last`` logged training losses (``metrics.jsonl``; each the mean over its logging
        interval of fresh training batches), or ``inf`` when the run folder has none."""
        from mesagen.runtime.train import read_metrics
        losses = [r["train_loss"] for r in read_metrics(self.run_dir) if "train_loss" in r] if self.run_dir else []
        return float(np.mean(losses[-last:])) if losses else float("inf")

    def per_t(self, name: str = "model") -> np.ndarray:
        """Per-position held-out loss of the model or a baseline, ``[T]``."""
        return np.asarray(self.result["per_t"][name])

    def mean(self, name: str = "model") -> float:
        """Mean held-out loss over positions of the model or a baseline (``eval.json``'s ``mean``)."""
        return float(self.result["mean"][name])

    def setting(self) -> str:
        """``"STEPS × BATCH, seed S"`` of the run."""
        c = self.config
        return f"{c.train.steps} × {c.train.batch_size}, seed {c.train.seed}"


def finished(run_dir: Path, config: RunConfig) -> bool:
    """Whether ``run_dir`` holds a finished run of exactly ``config`` (stored config equal, ``eval.json``
    written, checkpoint at the last step)."""
    from mesagen.runtime.train import read_checkpoint_header
    try:
        same = load_config(run_dir / "config.yaml", stored=True) == config
        return same and (run_dir / "eval.json").is_file() and \
            read_checkpoint_header(run_dir / "checkpoint.eqx").get("step") == config.train.steps
    except Exception:  # noqa: BLE001 - anything unreadable means "train it again"
        return False


def _train_run(name: str, budget: Budget, runs_dir: Path, log=print):
    """Train run ``name`` at ``budget`` into ``runs_dir/<its folder>`` (replacing what is there); the final
    :class:`~mesagen.runtime.train.TrainState` and the wall seconds. Used by :func:`get_run` and the workers of
    :func:`train_runs`, so both train a run the same way."""
    from mesagen.runtime.train import train
    config = run_config(name, budget)
    t0 = time.perf_counter()
    state = train(config, runs_dir / config.name, overwrite=True, log=log)
    return state, time.perf_counter() - t0


def get_run(name: str, budget: Budget, runs_dir: Path, log=print) -> Run:
    """Train run ``name`` into ``runs_dir/name`` or reuse it there (:func:`finished`)."""
    from mesagen.runtime.train import Trainer
    config = run_config(name, budget)
    run_dir = runs_dir / config.name
    if finished(run_dir, config):
        trainer = Trainer(config, json.loads((run_dir / "layers.json").read_text()))
        model = trainer.load(run_dir / "checkpoint.eqx").model
        log(f"reproduce: reusing {run_dir} ({budget.steps} steps)")
        return Run(config, trainer, model, json.loads((run_dir / "eval.json").read_text()), True, run_dir)
    log(f"reproduce: training {name} ({budget.steps} × {budget.batch}) into {run_dir}")
    state, seconds = _train_run(name, budget, runs_dir, log)
    log(f"reproduce: {name} trained in {seconds:.0f} s")
    return Run(config, Trainer(config), state.model, json.loads((run_dir / "eval.json").read_text()), False, run_dir)


@dataclass
class Row:
    """One claim of the table."""

    claim: str
    statement: str
    paper: str
    measured: str = "not run"
    setting: str = "–"
    status: str = "not run"
    figures: list[str] = field(default_factory=list)
    note: str = ""
    sections: list[str] = field(default_factory=list)    # Markdown lines of a section of its own (a table)
    provenance: str = ""    # the invocation that computed the row: time, machine, jax backend


#: A model whose mean loss is above this fraction of predict-0's has not learned the task at its budget.
UNDERTRAINED = 0.8


def undertrained(runs: list[Run | None]) -> list[str]:
    """Names of the runs whose mean held-out loss is ≥ :data:`UNDERTRAINED` × predict-0's."""
    return [r.config.name for r in runs if r is not None and r.mean() >= UNDERTRAINED * r.mean("predict_zero")]


def _flag(row: Row, runs: list[Run | None]) -> Row:
    """Mark ``row`` not meaningful where a model it rests on has not learned (a pass becomes partial)."""
    bad = undertrained(runs)
    if bad:
        row.measured = (f"NOT MEANINGFUL at this budget: {', '.join(bad)} did not learn (mean loss ≥ "
                        f"{UNDERTRAINED} × predict-0). " + row.measured)
        row.status = "partial" if row.status == "pass" else row.status
    return row


def _f(x: float, digits: int = 4) -> str:
    return f"{x:.{digits}g}"


# --------------------------------------------------------------------------------------------- claims ----
def claim1(run: Run, out: Path) -> Row:
    """Claim 1: the one-layer linear model is GD-1 with a learned step, weights in the GD block structure."""
    row = Row("1", "One linear SA layer on constructed tokens converges to GD-1 with a learned step size; its "
              "weights show the GD construction's W_KQ / W_PV block structure (reading them off as block-diagonal "
              "means loses almost nothing).", "model ≈ GD-1 (mean ≈ 0.899); projected ≈ trained")
    attn = run.model.blocks[0].attn
    d = run.config.task.observed_dim
    kq, pv = analysis.linear_effective_weights(attn)
    tokens = np.asarray(run.trainer.eval_tokens)
    targets = np.asarray(run.trainer.eval_targets, np.float64)
    clip = run.config.model.clip_activations

    def loss(k, p):
        return float(np.mean(0.5 * np.sum((analysis.linear_forward_np(tokens, k, p, d, clip) - targets) ** 2, -1)))

    trained = loss(kq, pv)
    consistency = abs(trained - run.mean()) / run.mean()
    means = loss(*analysis.block_project(kq, pv, d, gd_only=False))
    gd_only = loss(*analysis.block_project(kq, pv, d, gd_only=True))
    share = analysis.gd_block_share(kq, pv, d)
    kc, pc = (np.stack([analysis.block_coefficients(m, d) for m in mats]) for mats in (kq, pv))
    eta_eff = float(sum((kc[h, 3, 1] + kc[h, 3, 2]) * (pc[h, 1, 0] + pc[h, 2, 0]) for h in range(kq.shape[0])))
    gd1 = run.mean("gd1")
    row.measured = (f"model {_f(trained)} vs GD-1 {_f(gd1)} ({trained / gd1:.3f}×); block-diagonal means "
                    f"{_f(means)}, GD blocks only {_f(gd_only)} ({gd_only / trained:.3f}× trained); "
                    f"{share:.1%} of the weight mass in the GD blocks; learned step {eta_eff:.4g} vs GD-1's "
                    f"line-searched η {run.result['fitted']['gd1_eta']:.4g}")
    row.setting = run.setting()
    ok_gd, ok_proj = trained <= 1.05 * gd1, gd_only <= 1.05 * trained
    row.status = "pass" if ok_gd and ok_proj else "partial" if ok_gd or ok_proj else "fail"
    _flag(row, [run])
    row.note = (f"pass needs model ≤ 1.05 × GD-1 and GD-blocks-only ≤ 1.05 × trained. The numpy forward from "
                f"W_KQ = η W_K W_Qᵀ, W_PV = W_V W_O reproduces the model's loss to {consistency:.1e} (relative).")
    _plot_blocks(kq, pv, d, out / "claim1_weights.png")
    row.figures.append("claim1_weights.png")
    return row


def claim2(mesa: Run, lin1: Run | None, out: Path) -> Row:
    """Claim 2: one mesa layer ≈ ridge (mean within 5 %, ≤ 3× at every t ≥ 10), far better than one linear."""
    row = Row("2", "One mesa layer strongly outperforms one linear layer and behaves like ridge regression: mean "
              "loss within 5 % of in-context ridge and within 3× of ridge's loss at every t ≥ 10.",
              "mesa ≈ ridge (mean ≈ 0.19 vs 0.184)")
    m, r = mesa.per_t(), mesa.per_t("ridge")
    ratio = m / r
    worst_t = 10 + int(np.argmax(ratio[10:]))
    ok3 = np.nonzero([np.all(ratio[t:] <= 3) for t in range(10, len(m))])[0]
    from_t = f"≤ 3× from t = {10 + int(ok3[0])}" if len(ok3) else "never ≤ 3× at all later t"
    lin = f"; one linear layer {_f(lin1.mean())} ({lin1.mean() / mesa.mean():.1f}× mesa)" if lin1 else ""
    lam = mesa.result["params"].get("block_0", {}).get("lam", [])
    row.measured = (f"mean {_f(mesa.mean())} vs ridge {_f(mesa.mean('ridge'))} ({mesa.mean() / mesa.mean('ridge'):.3f}×); "
                    f"worst t ≥ 10: {ratio[worst_t]:.1f}× at t = {worst_t} ({from_t}); t = 10/20/49: "
                    f"{ratio[10]:.1f}×/{ratio[20]:.1f}×/{ratio[-1]:.1f}×{lin}; learned λ "
                    f"{', '.join(f'{x:.2g}' for x in lam)}")
    row.setting = mesa.setting()
    ok_mean, ok_t = mesa.mean() <= 1.05 * mesa.mean("ridge"), ratio[worst_t] <= 3
    attn = mesa.model.blocks[0].attn        # the layer as ridge in state space (analysis.mesa_state_space)
    ss = analysis.mesa_state_space(attn, mesa.config.task.observed_dim) \
        if getattr(getattr(attn, "layer", None), "SPEC_NAME", None) == "ridge" else None
    if ss is not None and mesa.trainer.eval_states is not None:
        from mesagen.runtime.baselines import per_t_loss, ridge
        st = mesa.trainer.eval_states
        lam_eff = float(np.exp(np.mean(np.log(ss["lam_state"]))))
        r_eff = per_t_loss(ridge(st, lam_eff), st[:, 1:])
        re = r_eff / r
        row.measured += (f"; effective state-space λ (λ / mean σ² of the key map) "
                         f"{', '.join(f'{x:.2g}' for x in ss['lam_state'])}; ridge at that λ: mean {r_eff.mean():.4g},"
                         f" t = 10/20/49: {re[10]:.1f}×/{re[20]:.1f}×/{re[-1]:.1f}× ridge's; off-span parts of keys "
                         f"(from s_t) {', '.join(f'{x:.1%}' for x in ss['key_offspan'])} and queries "
                         f"{', '.join(f'{x:.1%}' for x in ss['query_offspan'])}")
    row.status = "pass" if ok_mean and ok_t else "partial" if ok_mean or ok_t else "fail"
    _flag(row, [mesa])
    row.note = ("pass: both conditions. Diagnosis of the per-t gap (docs/paper.md §5): the layer is ridge in state "
                "space with coefficient λ / σ²(A) (A the key map of s_(t−1); analysis.mesa_state_space), and ridge at "
                "that λ has the model's per-t curve (measured column), so the gap at t ≈ D = 10 is ridge's own at a "
                "state-space λ far above ridge's tuned one; the learned λ stops where it does because keys and queries "
                "keep small components outside A's column space (measured column), which a smaller λ would fit with "
                "weight ~1/λ. The gap shrinks with training steps (measured in docs/paper.md §5).")
    curves = {"mesa (1 layer)": m, "ridge": r, "GD-1": mesa.per_t("gd1")}
    if lin1:
        curves["linear (1 layer)"] = lin1.per_t()
    _plot_curves(curves, out / "claim2_per_t.png", "claim 2: one mesa layer vs ridge, GD-1 and one linear layer")
    row.figures.append("claim2_per_t.png")
    return row


def _tuning_states(cfg: RunConfig) -> np.ndarray:
    """Sequences the Prop. 2 / GD fits are tuned on, float32 ``[tune_batch, T + 1, D]``: drawn from
    ``eval.seed + 1``, apart from the held-out set (claims 3 and 5)."""
    from mesagen.data import sample_states
    return np.asarray(sample_states(jax.random.PRNGKey(cfg.eval.seed + 1), cfg.task, cfg.eval.tune_batch))


def claim3(depth_runs: dict[int, Run], mesa: Run | None, out: Path, k_max: int, quick: bool = False) -> Row:
    """Claim 3: deeper linear models approach the mesa layer; per-t loss fitted by k steps of Proposition 2
    (Richardson-preconditioned input, then one GD step; :func:`analysis.fit_prop2_k`) and, for comparison, by
    k steps of plain GD."""
    row = Row("3", "Deeper linear models (2, 4, 6 layers) lower the loss monotonically toward, but not to, one "
              "mesa layer; their per-t loss follows k steps of an iterative algorithm (Prop. 2).",
              "monotone in depth, above mesa; k grows with depth")
    any_run = next(iter(depth_runs.values()))
    cfg = any_run.config
    tune = _tuning_states(cfg)
    _, gd = analysis.fit_gd_k(tune, any_run.trainer.eval_states, k_max)
    p2_params, p2 = analysis.fit_prop2_k(tune, any_run.trainer.eval_states, k_max, omegas=PROP2_OMEGAS)
    fits, parts = {}, []
    for depth, run in sorted(depth_runs.items()):
        k, rms = analysis.fit_k(run.per_t(), p2)
        kg, rms_g = analysis.fit_k(run.per_t(), gd)
        fits[depth] = k
        omega, c, eta = p2_params[k - 1]
        parts.append(f"{depth} layer{'s' * (depth > 1)}: {_f(run.mean())}, Prop. 2 k = {k}{'+' * (k == k_max)} "
                     f"(rms log error {rms:.2f}; ω {omega:.3g}, ρ {(1 - c) / omega:.3g}, η {eta:.3g}; "
                     f"plain GD k = {kg}{'+' * (kg == k_max)}, {rms_g:.2f})")
    means = [depth_runs[d].mean() for d in sorted(depth_runs)]
    monotone = all(a > b for a, b in zip(means, means[1:]))
    above = mesa is None or means[-1] > mesa.mean()
    row.measured = "; ".join(parts) + (f"; mesa {_f(mesa.mean())}" if mesa else "") + \
        f"; Prop. 2 (ω, c, η fitted per k): k = 1 {_f(p2[0].mean())}, best k = {int(np.argmin(p2.mean(1))) + 1} " \
        f"{_f(p2.mean(1).min())}; k-step GD: k = 1 {_f(gd[0].mean())}, best {_f(gd.mean(1).min())}"
    row.setting = "; ".join(f"{d}L {r.setting()}" for d, r in sorted(depth_runs.items()))
    ks = [fits[d] for d in sorted(fits)]
    k_grows = all(a <= b for a, b in zip(ks, ks[1:])) and ks[-1] > ks[0]
    deepest = depth_runs[max(depth_runs)]
    comp = compressed_model(deepest, quick=quick) if max(depth_runs) > 1 else None
    ok_comp = comp is not None and comp["pruned"] <= COMPRESSED_TOLERANCE * deepest.mean()
    if comp is not None:
        row.measured += (f"; compressed {max(depth_runs)}-layer model ({comp['params_per_head']} block scalars per "
                         f"head, read off the trained weights): {_f(comp['pruned'])} vs trained "
                         f"{_f(deepest.mean())} ({comp['pruned'] / deepest.mean():.3f}×; all 32 block scalars "
                         f"{_f(comp['block_scalar'])}; the 16 fine-tuned {_f(comp['compressed'])})")
    row.status = "pass" if monotone and above and k_grows and ok_comp else \
        "partial" if monotone or k_grows or ok_comp else "fail"
    _flag(row, list(depth_runs.values()))
    row.note = ("Prop. 2: k Richardson steps x_(j+1) = x_j + ω(s_t − (A_t + ρI)x_j) from 0 (damping c = 1 − ωρ), "
                "read out by one GD step η C_t x_k; (ω, c) on a grid and η in closed form per k, tuned on other "
                "sequences (c = 1, η = 1 is k-step GD, also fitted and shown). k fitted by the smallest rms "
                f"difference of log losses over t ≥ 1, k ≤ {k_max}. Depths missing from the table were not run."
                + (f" Compressed model (analysis.compress_linear_stack): every D×D slot block of each head's W_KQ and "
                   f"W_PV read off as c·I (32 scalars per head), the {comp['params_per_head']} largest |c| per head "
                   f"kept, then fine-tuned with Adam ({COMPRESS['steps']} steps, lr {COMPRESS['lr']}) on "
                   f"{COMPRESS['n_train']} training sequences, scored on the held-out set; which 16 the paper keeps is "
                   f"not stated in our sources, so the largest-mass blocks are ours. Kept blocks (layers × heads "
                   f"keeping each): " + ", ".join(f"{k} {v}" for k, v in comp["kept_blocks"].items())
                   + f". The numpy stack forward of the trained matrices reproduces the model's loss to "
                   f"{abs(comp['full'] - deepest.mean()) / deepest.mean():.1e} (relative). Pass also needs the "
                   f"16-scalar model read off the weights (before fine-tuning) within {COMPRESSED_TOLERANCE:.2f}× of "
                   f"the trained one; fine-tuning continues training ({COMPRESS['steps']} more steps at lr "
                   f"{COMPRESS['lr']:g} against the run's {deepest.config.train.schedule.peak_lr:g}), so the fine-tuned loss shows what 16 scalars per head can reach, not a match." if comp else ""))
    curves = {f"linear {d}L": r.per_t() for d, r in sorted(depth_runs.items())}
    if comp is not None:
        curves[f"compressed {max(depth_runs)}L ({comp['params_per_head']}/head)"] = comp["per_t"]
    if mesa:
        curves["mesa 1L"] = mesa.per_t()
    for d, k in sorted(fits.items()):
        curves[f"Prop. 2, k = {k} (fit to {d}L)"] = p2[k - 1]
    _plot_curves(curves, out / "claim3_depth.png", "claim 3: linear models by depth and their Prop. 2 fits")
    row.figures.append("claim3_depth.png")
    return row


#: Claim 3's compressed model (:func:`analysis.compress_linear_stack`): Adam steps, learning rate, minibatch and
#: the number of training sequences (drawn from ``eval.seed + 2``, other sequences than the held-out set).
COMPRESS = {"steps": 300, "lr": 3e-3, "batch": 128, "n_train": 1024, "keep": 16}
#: The compressed model "matches" the trained deepest linear model when its held-out loss is within this factor.
COMPRESSED_TOLERANCE = 1.05


def compressed_model(run: Run, quick: bool = False) -> dict:
    """Claim 3's compressed model of a trained linear stack ``run`` (constructed tokens; every block a generated
    ``linear`` layer without LayerNorm or MLP): :func:`analysis.compress_linear_stack` with :data:`COMPRESS`
    (``quick``: 5 steps on 64 sequences), scored on the run's held-out set.

    Raises:
        ValueError: a block is not a plain generated ``linear`` layer (:func:`analysis.linear_effective_weights`).
    """
    from mesagen.data import constructed_tokens, sample_states
    cfg, c = run.config, dict(COMPRESS)
    if quick:
        c.update(steps=5, n_train=64, batch=32)
    layers = [analysis.linear_effective_weights(b.attn) for b in run.model.blocks]
    states = sample_states(jax.random.PRNGKey(cfg.eval.seed + 2), cfg.task, c["n_train"])
    train = tuple(np.asarray(x) for x in constructed_tokens(states))
    heldout = (np.asarray(run.trainer.eval_tokens), np.asarray(run.trainer.eval_targets))
    return analysis.compress_linear_stack(layers, cfg.task.observed_dim, cfg.model.clip_activations, train, heldout,
                                          keep=c["keep"], steps=c["steps"], lr=c["lr"], batch=c["batch"])


#: Richardson step grid of the Proposition 2 fit (every other point of the GD line search's grid).
PROP2_OMEGAS = analysis.GD_ETA_GRID[::2]


#: Ridge coefficient of the preconditioned-input probe target (S Sᵀ + λI)⁻¹ s_t (the mesa layer's initial λ).
PROBE_LAMBDA = 1.0


def claim4(run: Run, out: Path) -> Row:
    """Claim 4: probes of every layer's residual stream for s_{t+1} and (S Sᵀ + λI)⁻¹ s_t."""
    row = Row("4", "Linear probes decode the next state s_{t+1} and the preconditioned input (S Sᵀ + λI)⁻¹ s_t "
              "better with depth and with t (probes fitted and scored on different sequences).",
              "R² rises with layer and with t")
    streams = analysis.residual_streams(run.model, run.trainer.eval_tokens)
    states = run.trainer.eval_states
    n_fit = states.shape[0] // 2
    targets = {"s_{t+1}": np.asarray(states[:, 1:], np.float64),
               "(SSᵀ+λI)⁻¹s_t": analysis.preconditioned_inputs(states, PROBE_LAMBDA)}
    r2 = {name: np.stack([analysis.probe_r2(x, y, n_fit) for x in streams]) for name, y in targets.items()}
    parts, ok = [], []
    for name, r in r2.items():
        late = r[:, 25:].mean(1)
        last = r[-1]
        parts.append(f"{name}: R² (mean over t ≥ 25) by layer 0…{len(streams) - 1}: "
                     + " ".join(f"{x:.2f}" for x in late) + f"; last layer t = 1…9 {last[1:10].mean():.2f} vs "
                     f"t ≥ 25 {last[25:].mean():.2f}")
        ok.append(late[-1] > late[0] and last[25:].mean() > last[1:10].mean())
    row.measured = "; ".join(parts)
    row.setting = f"{len(streams) - 1}-layer linear, {run.setting()}; probes fit on {n_fit}, scored on " \
                  f"{states.shape[0] - n_fit} sequences"
    row.status = "pass" if all(ok) else "partial" if any(ok) else "fail"
    _flag(row, [run])
    row.note = (f"layer 0 is the input; one ridge probe per (layer, t); λ = {PROBE_LAMBDA} in the target. Pass: for "
                "both targets the last layer beats layer 0 (t ≥ 25) and its R² at t ≥ 25 beats t = 1…9.")
    _plot_probes(r2, out / "claim4_probes.png")
    row.figures.append("claim4_probes.png")
    return row


def claim5(runs: dict[int, Run], k_max: int = 40, distill=None) -> Row:
    """Claim 5: softmax models on standard tokens. Token binding (the first layer's output at t decodes s_{t−1},
    probes fitted and scored on different sequences), the per-t loss of the 3- and 7-layer models against k steps
    of Proposition 2 (:func:`analysis.fit_prop2_k`, as in claim 3), and, with ``distill`` (a callable
    ``run -> dict``), the loss after swapping every layer after the first for a distilled linear layer.

    Args:
        runs: depth -> trained softmax run (the deepest is probed and distilled). k_max: largest Prop. 2 k.
    """
    row = Row("5", "In softmax models the first layer binds tokens (its output at t decodes s_{t−1}); later layers "
              "behave like linear attention (swapped for distilled linear layers with little loss); 3- and 7-layer "
              "softmax models follow 3 and 7 steps of Prop. 2.",
              "s_{t−1} decodable after layer 1; k ≈ depth")
    deepest = runs[max(runs)]
    streams = analysis.residual_streams(deepest.model, deepest.trainer.eval_tokens)
    states = deepest.trainer.eval_states
    prev = np.concatenate([np.zeros_like(states[:, :1]), states[:, :-2]], 1).astype(np.float64)   # s_{t-1}
    n_fit = states.shape[0] // 2
    r0, r1 = (analysis.probe_r2(streams[i][:, 1:], prev[:, 1:], n_fit).mean() for i in (0, 1))
    parts = [f"R² of s_{{t−1}} (mean over t ≥ 1, {max(runs)}-layer): input {r0:.2f}, after layer 1 {r1:.2f}"]
    cfg = deepest.config
    tune = _tuning_states(cfg)
    _, p2 = analysis.fit_prop2_k(tune, states, k_max, omegas=PROP2_OMEGAS)
    from mesagen.runtime.baselines import fit_softmax_kernel_beta, per_t_loss, softmax_kernel
    beta = fit_softmax_kernel_beta(tune)
    kernel = per_t_loss(softmax_kernel(np.asarray(states), beta), np.asarray(states)[:, 1:]).mean()
    parts.append(f"softmax kernel regression ŝ = Σ_(i<t) s_(i+1) softmax_i(β s_iᵀ s_t), β tuned ({beta:.3g}): mean "
                 f"{_f(kernel)}")
    fits = {}
    for depth, run in sorted(runs.items()):
        k, rms = analysis.fit_k(run.per_t(), p2)
        fits[depth] = k
        parts.append(f"{depth}-layer: mean {_f(run.mean())} (ridge {_f(run.mean('ridge'))}), Prop. 2 k = "
                     f"{k}{'+' * (k == k_max)} (rms log error {rms:.2f})")
    ok_bind = r1 > 0.5 and r1 > r0 + 0.3
    ks = [fits[d] for d in sorted(fits)]
    ok_k = len(ks) > 1 and all(a < b for a, b in zip(ks, ks[1:]))
    ok_swap = None
    if distill is not None:
        d = distill(deepest)
        base = deepest.mean()
        ok_swap = min(d["normalized"]["all"], d["sequential"]["all"]) <= SWAP_TOLERANCE * base
        for name, label in (("normalized", "1/(t+1)-normalised linear layers"), ("plain", "plain linear layers")):
            sw = d[name]
            errs = [r["rel_error"] for r in d[name + "_report"]["layers"].values()]
            parts.append(f"layers 2…{max(runs)} swapped for distilled {label}: {_f(sw['all'])} "
                         f"({sw['all'] / base:.2f}× the trained {_f(base)}); one layer at a time (layer 2…"
                         f"{max(runs)}): " + " ".join(f"{v / base:.2f}×" for v in sw["one"].values())
                         + f"; fitted relative error {min(errs):.3f}…{max(errs):.3f}")
        sq = d["sequential"]["all"]
        parts.append(f"normalised layers fitted in order on the already-swapped model (distill sequential=True): "
                     f"all swapped {_f(sq)} ({sq / base:.2f}×)")
    row.measured = "; ".join(parts)
    row.setting = "; ".join(f"{d}-layer softmax {r.setting()}" for d, r in sorted(runs.items()))
    checks = [ok_bind, ok_k] + ([ok_swap] if ok_swap is not None else [])
    row.status = "pass" if all(checks) and ok_swap is not None else "partial" if any(checks) else "fail"
    _flag(row, list(runs.values()))
    row.note = ("binding: ridge probes of the stream before and after the first block for s_(t−1), fitted on half "
                "of the held-out sequences and scored on the other half; needs R² > 0.5 and 0.3 above the input's. "
                "Prop. 2 fitted as in claim 3 (tuned on other sequences); k must grow with depth. "
                + ("Distillation: " + DISTILL_NOTE + f" Pass needs the swapped model within {SWAP_TOLERANCE}× of the "
                   "trained one." if distill is not None else "Distillation not run: partial at best."))
    return row


#: Claim 5: a softmax model whose later layers are swapped for distilled linear ones "loses little" when its held-out
#: loss stays within this factor of the trained model's.
SWAP_TOLERANCE = 1.25
#: Claim 5's distillation (:func:`mesagen.runtime.distill.distill_linear_layers`): Adam steps, learning rates of the
#: normalised and the plain layer (1e-2 diverges for the plain one, measured), training sequences.
DISTILL = {"steps": 500, "lr": 1e-2, "plain_lr": 2e-3, "n_train": 256}
DISTILL_NOTE = ("every block after the first gets a causal linear self-attention layer (distill.LinearAttention) "
                "fitted by Adam to that block's softmax-attention output on the block's own input (the trained "
                "model's LN1 output) on {n_train} training sequences (seed eval.seed + 1000), initialised from the "
                "softmax layer's W_Q/√d_k, W_K, W_V, W_O with the output rescaled by least squares, {steps} steps, "
                "lr {lr} (normalised) / {plain_lr} (plain); then all of them, and each alone, are swapped into the "
                "model and it is scored on the held-out set. Two layers: the paper's plain one, o_t = Σ_(i≤t) v_i "
                "k_iᵀ q_t, and the same divided by t + 1; the plain one cannot follow a softmax average, whose scale "
                "does not grow with t, so the normalised one is the test. Fitted independently, each layer "
                "learns its teacher on the original model's inputs and the errors compound when all are "
                "swapped; fitted sequentially, layer i is fitted on the model with layers 2…i−1 already swapped, to "
                "the original's stream after block i's attention (it also cancels the earlier layers' drift). Pass "
                "reads the better of the two all-swapped losses.").format(**DISTILL)


def distill_softmax(run: Run, quick: bool = False) -> dict:
    """Claim 5's distillation of ``run`` (a softmax model): every block after the first swapped for distilled
    linear layers, normalised and plain (:data:`DISTILL`; ``quick``: 5 steps on 16 sequences).

    Returns:
        dict: ``normalized`` / ``plain`` (each layer fitted on the original model's inputs) and ``sequential``
        (normalised, each layer fitted on the model with the earlier ones swapped, to the original's stream):
        :func:`mesagen.runtime.distill.swap_losses` (held-out losses ``original``, ``all``, ``one`` by block
        index); ``NAME_report``: the fits.
    """
    from mesagen.data import sample_states
    from mesagen.runtime.distill import distill_linear_layers, swap_losses
    from mesagen.runtime.train import batch_from_states
    cfg, c = run.config, dict(DISTILL)
    if quick:
        c.update(steps=5, n_train=16)
    tokens = batch_from_states(cfg, sample_states(jax.random.PRNGKey(cfg.eval.seed + 1000), cfg.task, c["n_train"]))[0]
    layers = list(range(1, len(run.model.blocks)))
    out = {}
    for name, normalize, lr, sequential in (("normalized", True, c["lr"], False), ("plain", False, c["plain_lr"], False),
                                            ("sequential", True, c["lr"], True)):
        new, rep = distill_linear_layers(run.model, tokens, layers, steps=c["steps"], lr=lr, normalize=normalize,
                                         sequential=sequential)
        out[name] = swap_losses(run.model, new, layers, lambda m: float(run.trainer.evaluate(m).mean()))
        out[name + "_report"] = rep
    return out


def claim6(by_task: dict[str, dict[str, Run]], out: Path) -> Row:
    """Claim 6: the hybrid (softmax, then mesa) against the other models on each task family.

    Args:
        by_task: task kind (``fully_observed``, ``partially_observed``, ``nonlinear``) -> model label -> run;
            every task's dict holds ``hybrid``. The runs of one task share the held-out states (same task and
            ``eval.seed``), so their means and the baselines of any of them compare directly.
        out: folder of the figure ``claim6_tasks.png`` (one panel of per-t curves per task).
    """
    row = Row("6", "The 2-layer hybrid (softmax, then mesa) is the strongest model on all three task families.",
              "hybrid lowest loss on fully/partially observed and nonlinear tasks")
    parts, wins, runs = [], {}, []
    for kind, models in by_task.items():
        ref = models["hybrid"]
        ranked = sorted([(n, r.mean()) for n, r in models.items()] +
                        [("ridge", ref.mean("ridge")), ("GD-1", ref.mean("gd1"))], key=lambda x: x[1])
        standard = [n for n, _ in ranked if n in models and models[n].config.model.tokens == "standard"]
        wins[kind] = standard[0] == "hybrid"
        parts.append(f"{kind.replace('_', ' ')}: " + ", ".join(f"{n} {_f(m)}" for n, m in ranked))
        runs += list(models.values())
    row.measured = "mean loss, lowest first (ridge and GD-1 tuned in context on the observed states): " + \
        "; ".join(parts)
    settings = {}
    for models in by_task.values():
        for n, r in models.items():
            settings.setdefault(n, set()).add(r.setting())
    row.setting = "; ".join(f"{n} {', '.join(sorted(v))}" for n, v in settings.items())
    row.status = "pass" if len(wins) == 3 and all(wins.values()) else "partial" if any(wins.values()) else "fail"
    _flag(row, runs)
    missing = [k for k in ("fully_observed", *TASK_FAMILIES) if k not in by_task]
    row.note = ("pass: the hybrid has the lowest mean held-out loss of the standard-token models (the paper's "
                "comparison: the hybrid against the 7-layer softmax Transformer, both seeing s_t through a learned "
                "embedding) on all three task families (partial: on some). For scale, models on constructed tokens "
                "[0, s_t, s_t, s_(t−1)], which hand the layer the previous state: one mesa layer (12000 steps on the "
                "fully observed task, claim 2's run; 1500 on the others) and the 6-layer linear model (fully "
                "observed only). "
                "Partially observed: 5 observed dimensions of 15 hidden ones, so one-step ridge on the observed "
                "states is not the Bayes predictor there (it is shown for scale)."
                + (f" Not run: {', '.join(missing)}." if missing else ""))
    _plot_tasks(by_task, out / "claim6_tasks.png")
    row.figures.append("claim6_tasks.png")
    return row


def _plot_tasks(by_task: dict[str, dict[str, Run]], path: Path) -> None:
    """One log-scale panel of per-t held-out loss per task family: every model, ridge and GD-1."""
    from mesagen.runtime.figures import plt
    fig, axes = plt.subplots(1, len(by_task), figsize=(4.6 * len(by_task), 3.8), dpi=110, squeeze=False)
    for ax, (kind, models) in zip(axes[0], by_task.items()):
        ref = models["hybrid"]
        curves = {**{n: r.per_t() for n, r in models.items()}, "ridge": ref.per_t("ridge"), "GD-1": ref.per_t("gd1")}
        _draw_curves(ax, curves, kind.replace("_", " "))
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, which="both")
    fig.suptitle("claim 6: the hybrid (softmax, then mesa) on the three task families", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


#: Claim 7's prompt tuning: Adam steps and learning rate per stage, training prompts, learned prefix states, the
#: initial scale of EOS and prefix (N(0, init_std²); a zero prefix is a saddle: zero tokens give zero keys and
#: values; an EOS drawn at scale 0.5 ended at a worse training objective than one started at 0, measured on the
#: shipped mesa_1layer run with 150-300 steps: 1.26 vs 0.97).
PROMPT_TUNING = {"steps": 200, "lr": 0.03, "n_train": 128, "prefix": 10, "init_std": 0.1}


def fewshot_prompting(model, rc, n_eval: int, *, steps: int, lr: float, n_train: int, n_prefix: int,
                      init_std: float = 0.1, seed: int = 7) -> dict:
    """Claim 7's experiment: a frozen constructed-token dynamics model prompted with regression sequences, plain,
    with a learned EOS state after every pair, and with EOS plus ``n_prefix`` learned prefix states (the paper's
    Sec. 5; :func:`mesagen.runtime.analysis.tune_prompt_tokens`). The EOS is tuned first (from N(0, init_std²));
    the prefix is then tuned together with it (EOS from the EOS-only solution, prefix from N(0, init_std²)).

    Training and held-out prompts are drawn from different keys: held-out ``PRNGKey(seed)`` (``n_eval`` prompts),
    training ``fold_in(PRNGKey(seed), 1)`` (``n_train``).

    Args:
        model: frozen :class:`~mesagen.runtime.model.Model` on constructed tokens of dimension ``rc.dim``.
        rc: :class:`~mesagen.data.RegressionConfig` (D, pairs N). n_eval, n_train: prompts (≥ 1).
        steps, lr: Adam steps and learning rate of each stage. n_prefix: prefix states P (≥ 1).
        init_std: initial scale of EOS and prefix. seed: prompt key.

    Returns:
        dict: ``heldout`` and ``train`` (``(x, y)`` float32 ``[B, N, D]``), ``tokens`` (``eos`` [D], ``eos_prefix``
        ``{"eos": [D], "prefix": [P, D]}``), ``objective`` (training objective per step, float64, per stage
        ``eos`` / ``eos_prefix``), ``curves`` (held-out per-pair loss ``[N]`` float64: ``plain``, ``eos``,
        ``eos_prefix``).

    Raises:
        ValueError: a count < 1, or as :func:`~mesagen.runtime.analysis.tune_prompt_tokens`.
    """
    from mesagen.data import sample_regression
    if min(n_eval, n_train, n_prefix) < 1:
        raise ValueError(f"fewshot_prompting: need n_eval, n_train, n_prefix >= 1, got {n_eval}, {n_train}, {n_prefix}")
    key = jax.random.PRNGKey(seed)
    held = sample_regression(key, rc, n_eval)
    train = sample_regression(jax.random.fold_in(key, 1), rc, n_train)
    eos0 = init_std * np.asarray(jax.random.normal(jax.random.fold_in(key, 3), (rc.dim,)))
    eos, obj_eos = analysis.tune_prompt_tokens(model, *train, eos=eos0, prefix=None, steps=steps, lr=lr)
    prefix0 = init_std * np.asarray(jax.random.normal(jax.random.fold_in(key, 2), (n_prefix, rc.dim)))
    both, obj_both = analysis.tune_prompt_tokens(model, *train, eos=eos["eos"], prefix=prefix0, steps=steps, lr=lr)

    def curve(**tok):
        return np.asarray(analysis.prompt_pair_losses(model, *held, **tok), np.float64)

    return {"heldout": held, "train": train, "tokens": {"eos": eos["eos"], "eos_prefix": both},
            "objective": {"eos": obj_eos, "eos_prefix": obj_both},
            "curves": {"plain": curve(), "eos": curve(eos=eos["eos"]), "eos_prefix": curve(**both)}}


def claim7(mesa: Run, out: Path, quick: bool = False) -> Row:
    """Claim 7: the mesa model trained on dynamics, prompted with [x₁, y₁, x₂, y₂, …] regression sequences,
    plain and with a tuned EOS state / EOS + prefix (:func:`fewshot_prompting`)."""
    from mesagen.data import RegressionConfig
    row = Row("7", "Models trained only on dynamics do few-shot regression when prompted with [x₁, y₁, x₂, y₂, …] "
              "(loss first rises, like least squares on the spurious pairs; EOS / prefix tokens improve it).",
              "loss falls with the number of pairs; a tuned EOS and prefix lower it")
    rc = RegressionConfig(dim=mesa.config.task.observed_dim, num_pairs=mesa.config.task.seq_len // 2)
    n = mesa.config.eval.batch
    tune = dict(PROMPT_TUNING, **({"steps": 5, "n_train": 16} if quick else {}))
    t0 = time.perf_counter()
    res = fewshot_prompting(mesa.model, rc, n, steps=tune["steps"], lr=tune["lr"], n_train=tune["n_train"],
                            n_prefix=tune["prefix"], init_std=tune["init_std"])
    tune_s = time.perf_counter() - t0
    c = res["curves"]
    loss, eos, both = c["plain"], c["eos"], c["eos_prefix"]
    x, y = (np.asarray(a, np.float64) for a in res["heldout"])
    # least squares on the (x_i, y_i) pairs only: the same prompt without the spurious pairs (λ = 1e-3)
    lam = 1e-3
    ls = []
    for i in range(rc.num_pairs):
        a = np.einsum("bni,bnj->bij", x[:, :i], x[:, :i]) + lam * np.eye(rc.dim)
        cc = np.einsum("bni,bnj->bij", y[:, :i], x[:, :i])
        p = np.einsum("bij,bj->bi", cc, np.linalg.solve(a, x[:, i][..., None])[..., 0])
        ls.append(0.5 * np.mean(np.sum((p - y[:, i]) ** 2, -1)))
    ls = np.asarray(ls)
    zero = 0.5 * np.mean(np.sum(y ** 2, -1), 0)
    # in-context ridge on the prompt read as a dynamics sequence: every consecutive pair, spurious (y_i, x_{i+1}) too
    from mesagen.runtime.baselines import ridge
    states = np.asarray(analysis.regression_prompt_states(res["heldout"][0], res["heldout"][1])[0], np.float64)
    ls_all = 0.5 * np.mean(np.sum((ridge(states, mesa.result["fitted"]["ridge_lambda"])[:, 0::2] - y) ** 2, -1), 0)
    late = slice(rc.num_pairs // 2, None)

    def rise(cv):       # the early rise: how far the loss climbs above its value at pair 1 (≥ 0)
        return max(0.0, float(cv.max() - cv[0]))

    pts = (0, 4, 11, rc.num_pairs - 1)
    fmt = lambda cv: "/".join(f"{cv[i]:.3f}" for i in pts)                                   # noqa: E731
    obj, tok = res["objective"], res["tokens"]
    row.measured = (f"held-out loss at pair {'/'.join(str(i + 1) for i in pts)}: plain {fmt(loss)}, EOS {fmt(eos)}, "
                    f"EOS + {tune['prefix']}-state prefix {fmt(both)}; second-half mean plain {loss[late].mean():.3f}, "
                    f"EOS {eos[late].mean():.3f}, EOS + prefix {both[late].mean():.3f} (predict-0 "
                    f"{zero[late].mean():.3f}, least squares on the (x, y) pairs only {ls[late].mean():.3g}); mean "
                    f"over all pairs plain {loss.mean():.3f}, EOS {eos.mean():.3f}, EOS + prefix {both.mean():.3f}; rise "
                    f"above pair 1: plain {rise(loss):.3f}, EOS {rise(eos):.3f}, EOS + prefix {rise(both):.3f}; "
                    f"ridge on all consecutive pairs (spurious (y_i, x_(i+1)) included) at the same pairs "
                    f"{fmt(ls_all)}; training objective EOS {obj['eos'][0]:.3f} → {obj['eos'][-1]:.3f}, EOS + prefix "
                    f"{obj['eos_prefix'][0]:.3f} → {obj['eos_prefix'][-1]:.3f}; ‖EOS‖ "
                    f"{np.linalg.norm(tok['eos']):.3f} (EOS only), {np.linalg.norm(tok['eos_prefix']['eos']):.3f} "
                    f"(with prefix), prefix states' mean norm "
                    f"{np.linalg.norm(tok['eos_prefix']['prefix'], axis=1).mean():.3f}")
    row.setting = (f"mesa model of claim 2 ({mesa.setting()}), frozen; EOS state, then EOS + {tune['prefix']} prefix "
                   f"states tuned by Adam (lr {tune['lr']}, {tune['steps']} full-batch steps each) on "
                   f"{tune['n_train']} training prompts, scored on {n} other prompts of {rc.num_pairs} pairs ({tune_s:.0f} s)")
    prompted = loss[late].mean() < 0.5 * zero[late].mean() and loss[late].mean() < loss[:3].mean()
    eos_ok = eos[late].mean() < loss[late].mean() and rise(eos) < rise(loss)
    prefix_ok = both.mean() < eos.mean()
    row.status = "pass" if prompted and eos_ok and prefix_ok else "partial" if prompted or eos_ok else "fail"
    _flag(row, [mesa])
    row.note = ("EOS and prefix are learned states in R^D (tokens built from them like any state: the token after "
                "the EOS has it in its previous-state slot), tuned with the model frozen; all curves on held-out "
                "prompts. The tuned EOS ends near the zero state (‖EOS‖ in the measured column): a zero state gives "
                "the token after it a zero previous-state slot, hence a near-zero key (the key reads s_(t−1)), so the "
                "spurious pair (y_i, x_(i+1)) becomes (y_i, 0) plus a pair without weight; a state-space EOS cannot "
                "remove (y_i, EOS) itself. pass: plain prompting works (second-half loss < ½ predict-0 and below the "
                "first pairs'), "
                "the EOS lowers the second-half loss and shrinks the early rise (max loss − loss at pair 1), and the "
                "prefix lowers the mean over all pairs further (the objective both stages are tuned on); partial: "
                "plain prompting or the EOS condition holds.")
    _plot_curves({"mesa model, plain prompt": loss, "with tuned EOS": eos, "with tuned EOS + prefix": both,
                  "least squares on (x, y) pairs (λ=1e-3)": np.maximum(ls, 1e-8),
                  "ridge on all consecutive pairs": ls_all, "predict 0": zero}, out / "claim7_fewshot.png",
                 "claim 7: few-shot regression by the mesa model trained on dynamics (held-out prompts)",
                 xlabel="pairs in context")
    row.figures.append("claim7_fewshot.png")
    return row


def claim8(run: Run) -> Row:
    """Claim 8: fixed teacher, one linear layer vs GD-1 and its GD block signature."""
    row = Row("8", "Fixed teacher (one W* for all sequences): a 1-layer model beats GD-1 by memorising W*, with no "
              "mesa signature (negative control).", "model < GD-1; no GD structure")
    d = run.config.task.observed_dim
    kq, pv = analysis.linear_effective_weights(run.model.blocks[0].attn)
    share = analysis.gd_block_share(kq, pv, d)
    per_t = run.per_t()
    row.measured = (f"model {_f(run.mean())} vs GD-1 {_f(run.mean('gd1'))} ({run.mean() / run.mean('gd1'):.3f}×); "
                    f"loss at t = 1 {per_t[1]:.3g}, t = 49 {per_t[-1]:.3g}; {share:.1%} of the weight mass in the GD "
                    "blocks")
    row.setting = run.setting()
    row.status = "pass" if run.mean() < run.mean("gd1") and share < 0.5 else "fail"
    _flag(row, [run])
    row.note = "pass: below GD-1 and under half the weight mass in the GD blocks (claim 1's measure)."
    return row


#: Positions t (context pairs) of the family table's per-t columns (the task has t = 0…seq_len − 1).
FAMILY_T = (1, 10, 25, 49)

#: ``(B, T, H, K)`` (V = K) of the family's recurrent-forward throughput (the README's speed-table shape).
THROUGHPUT_SHAPE = (8, 1024, 4, 32)


def layer_inputs(layer, b: int, t: int, h: int, k: int, v: int, seed: int = 0) -> tuple:
    """Random float32 arguments of any generated layer module: ``q [B, T, H, K]`` ~ N(0, 1), ``k [B, T, H, K]``
    ~ N(0, 1/K), ``v [B, T, H, V]`` ~ N(0, 1), the spec's parameters at ``init_params`` and every per-token input
    of ``layer.INPUTS`` mapped the way the trainer maps it (:func:`mesagen.runtime.layers.input_map` of a
    N(0, 1) projection plus the trainer's initial bias: +3 for gates, 0 otherwise), in its declared shape.

    Returns:
        ``(q, k, v, params, inputs)``.

    Raises:
        LayerLoadError: an input of unsupported shape, domain or space.
    """
    import jax.numpy as jnp

    from mesagen.runtime.layers import GATE_BIAS_INIT, input_channels, input_map, is_gate
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, t, h, k)), jnp.float32)
    kk = jnp.asarray(rng.standard_normal((b, t, h, k)) / np.sqrt(k), jnp.float32)
    vv = jnp.asarray(rng.standard_normal((b, t, h, v)), jnp.float32)
    params = {n: jnp.asarray(x, jnp.float32) for n, x in layer.init_params(h, k, v, jnp.float32).items()}
    inputs = {}
    for n, spec in layer.INPUTS.items():
        c = input_channels(n, spec, k, v)
        z = rng.standard_normal((b, t, h) + (() if c is None else (c,))) + (GATE_BIAS_INIT if is_gate(spec) else 0.0)
        inputs[n] = input_map(jnp.asarray(z, jnp.float32), spec["domain"], spec["space"])
    return q, kk, vv, params, inputs


def forward_tokens_per_s(layer, form: str = "recurrent", shape: tuple[int, int, int, int] = THROUGHPUT_SHAPE,
                         repeats: int = 3) -> float:
    """Forward throughput of a generated layer module, tokens (B·T) per second: the median wall time of
    ``repeats`` jitted JAX ``forward(..., form=form)`` calls in float32 on :func:`layer_inputs` of ``shape``
    ``(B, T, H, K)`` (V = K), after one warm-up call (compilation).

    Raises:
        LayerLoadError: as :func:`layer_inputs`. ValueError: ``form`` not in ``layer.FORMS``.
    """
    if form not in layer.FORMS:
        raise ValueError(f"form {form!r}: layer {layer.SPEC_NAME!r} offers {layer.FORMS}")
    b, t, h, k = shape
    q, kk, vv, params, inputs = layer_inputs(layer, b, t, h, k, k)
    run = jax.jit(lambda q, k, v, p, i: layer.forward(q, k, v, p, form=form, **i)[0])
    jax.block_until_ready(run(q, kk, vv, params, inputs))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run(q, kk, vv, params, inputs))
        times.append(time.perf_counter() - t0)
    return b * t / float(np.median(times))


def _params_cell(result: dict) -> str:
    from mesagen.runtime.evaluate import _head_value
    from mesagen.runtime.figures import GREEK
    ps = result.get("params", {}).get("block_0", {})
    return "; ".join(f"{GREEK.get(n, n)} {', '.join(_head_value(x) for x in v)}" for n, v in ps.items()) or "–"


def claim9(runs: dict[str, Run]) -> Row:
    """Claim 9 (the paper's appendix): in byte-level language models, softmax -> mesa beats softmax -> linear
    attention in perplexity and in-context-learning score and nearly matches softmax -> softmax.

    Pass: mesa's validation bits/byte below linear's and within 2 % of softmax's, and its ICL score (late minus
    early positions' loss, nats; lower is better) below linear's. Partial: the perplexity parts only.
    """
    row = Row("9", *_STATEMENTS["9"])
    got = {n: r for n, r in runs.items() if r is not None}
    if set(got) != set(LM_RUNS):
        row.measured = "not run: " + ", ".join(n for n in LM_RUNS if n not in got) + " missing"
        return row
    bpb = {n: got[n].result["eval_bpb"] for n in LM_RUNS}
    icl = {n: got[n].result["eval_icl"] for n in LM_RUNS}
    row.measured = "; ".join(f"{n.removeprefix('lm_')}: {bpb[n]:.3f} bits/byte, perplexity "
                             f"{got[n].result['eval_ppl']:.2f}, ICL score {icl[n]:+.3f} nats" for n in LM_RUNS)
    row.setting = "; ".join(f"{n} {got[n].setting()}" for n in LM_RUNS) + \
        f"; validation on {got['lm_mesa'].result['eval_sequences']} windows of the held-out split"
    beats = bpb["lm_mesa"] < bpb["lm_linear"]
    near = bpb["lm_mesa"] <= 1.02 * bpb["lm_softmax"]
    icl_beats = icl["lm_mesa"] < icl["lm_linear"]
    row.status = "pass" if beats and near and icl_beats else "partial" if beats and near else "fail"
    row.note = ("byte-level models on the Python standard library's sources (docs/lm.md): d_model 64, 2 blocks, "
                "the first softmax, the second as named; mesa and linear with L2-normalised q and k (the paper's "
                "stabiliser; not run without it). Pass needs mesa below linear in bits/byte and in ICL score and "
                "within 2 % of softmax in bits/byte. One seed: differences of a few hundredths of a bit are within "
                "what another seed could change.")
    return row


def family_row(runs: dict[str, Run], out: Path, *, shape: tuple[int, int, int, int] = THROUGHPUT_SHAPE,
               repeats: int = 3, log=print, lr_tried: dict[str, dict[float, tuple[float, float]]] | None = None) -> Row:
    """The family comparison: every layer of :data:`FAMILY` trained as ``family_NAME`` at one budget.

    Writes ``out/family_per_t.png`` (every layer, GD-1 and ridge per t) and puts the family table -- per layer
    the mean held-out loss, its ratio to the GD-1 and ridge baselines, the loss at :data:`FAMILY_T`, the learned
    spec parameters, the recurrent-forward throughput (:func:`forward_tokens_per_s`, measured here, side by
    side, at ``shape``) and the training steps/s -- into the row's ``sections``.

    Args:
        runs: ``{"family_NAME": Run}``, at least one.  out: the figure's folder.
        shape, repeats: of the throughput measurement.  log: progress lines.
        lr_tried: per run, ``{lr scale: (final training loss, mean held-out loss)}`` of every learning-rate scale
            tried (:data:`FAMILY_LR_SCALES`); ``runs`` holds the chosen one. Shown in the table when given.

    Returns:
        The row: pass when the mesa layer (``ridge``) has the lowest mean loss of the family, fail when not,
        not meaningful (and never pass) when a layer did not learn (:func:`undertrained`).
    """
    row = Row("family", "(mesagen, not in the paper) Every shipped layer as one layer on the fully observed task at "
              "one budget (the mesa config's task, sizes, optimiser and seed): the mesa layer (ridge) has the "
              "lowest mean loss of the family.", "– (claim 2: mesa ≈ ridge, far below one linear layer)")
    any_run = next(iter(runs.values()))
    gd1, ridge = any_run.mean("gd1"), any_run.mean("ridge")
    ranked = sorted(runs.items(), key=lambda x: x[1].mean())
    speed = {}
    for name, r in ranked:
        attn = r.model.blocks[0].attn
        try:
            speed[name] = forward_tokens_per_s(attn.layer, attn.form, shape, repeats)
        except Exception as exc:  # noqa: BLE001 - a layer that cannot be timed keeps its accuracy row
            log(f"reproduce: family: timing {name} failed: {type(exc).__name__}: {exc}")
    base_speed = speed.get("family_linear")
    ts = [t for t in FAMILY_T if t < len(any_run.per_t())]
    short = lambda n: n.removeprefix("family_")  # noqa: E731
    row.measured = ("mean loss (× ridge baseline): " + ", ".join(f"{short(n)} {_f(r.mean(), 3)} ({r.mean() / ridge:.2f}×)"
                                                               for n, r in ranked)
                    + f"; baselines GD-1 {_f(gd1)}, ridge {_f(ridge)}; full table below")
    row.setting = f"each {any_run.setting()} ({FAMILY_BASE}'s optimiser and schedule" + (
        f"; peak lr × {' or × '.join(f'{x:g}' for x in FAMILY_LR_SCALES)}, chosen per layer by final training loss)"
        if lr_tried else ")")
    best = short(ranked[0][0])
    if "family_ridge" in runs:
        rank = [n for n, _ in ranked].index("family_ridge") + 1
        row.status = "pass" if rank == 1 else "fail"
        row.note = (f"the mesa layer ranks {rank} of {len(ranked)} (lowest: {best}). Pass: ridge lowest. All "
                    "runs share steps × batch, seed, data, optimiser (AdamW, warm-up + cosine) and sizes; λ learns at "
                    "the base config's 100× rate in every layer that has one (ridge, rls_forgetting, mesanet)."
                    + (" Each layer is trained at the base's learning rate and at "
                       + " and ".join(f"{x:g}×" for x in FAMILY_LR_SCALES if x != 1)
                       + " it (the base's peak lr is the paper's for 20× more steps); the table keeps the run with "
                       "the lower final training loss (fresh sequences every step, none of them held out), and "
                       "shows both." if lr_tried else ""))
    else:
        row.status = "partial"
        row.note = "the mesa layer (ridge) was not run: no verdict."
    b, t, h, k = shape
    lines = [f"Per layer: one layer, {any_run.setting()}; held-out loss ½‖ŝ − s‖² (mean over t = 0…"
             f"{len(any_run.per_t()) - 1} and at t = {', '.join(map(str, ts))}), its ratio to the tuned GD-1 and "
             f"ridge baselines, the learned spec parameters (per head), the JAX recurrent-forward throughput at "
             f"B, T, H, K = V = {b}, {t}, {h}, {k}, float32 (median of {repeats}, all layers timed one after the "
             "other in this run; × linear in parentheses) and the training steps/s of the run.", "",
             "| layer | mean loss | × GD-1 | × ridge | " + " | ".join(f"t = {t_}" for t_ in ts)
             + " | learned parameters | fwd tokens/s | train steps/s |" + (" peak lr (final train loss per lr scale) |"
                                                                          if lr_tried else ""),
             "|---|" + "---|" * (6 + len(ts) + bool(lr_tried))]
    for name, r in ranked:
        pt = r.per_t()
        sp = speed.get(name)
        sp_cell = "–" if sp is None else f"{sp:,.0f}" + (f" ({sp / base_speed:.2f}×)" if base_speed else "")
        sps = r.result.get("steps_per_s")
        lines.append(f"| {short(name)} | {_f(r.mean())} | {r.mean() / gd1:.3f} | {r.mean() / ridge:.3f} | "
                     + " | ".join(f"{pt[t_]:.4g}" for t_ in ts) + f" | {_params_cell(r.result)} | {sp_cell} | "
                     + ("–" if not sps else f"{sps:.1f}") + " |"
                     + (f" {r.config.train.schedule.peak_lr:.3g} (" + ", ".join(f"×{x:g}: {tl:.4g}" for x, (tl, _) in
                                                           sorted(lr_tried.get(name, {}).items())) + ") |"
                        if lr_tried else ""))
    for label, key in (("GD-1 (tuned η)", "gd1"), ("ridge (tuned λ)", "ridge"), ("predict 0", "predict_zero")):
        pt = any_run.per_t(key)
        lines.append(f"| *{label}* | {_f(any_run.mean(key))} | {any_run.mean(key) / gd1:.3f} | "
                     f"{any_run.mean(key) / ridge:.3f} | " + " | ".join(f"{pt[t_]:.4g}" for t_ in ts) + " | – | – | – |"
                     + (" – |" if lr_tried else ""))
    row.sections = ["## Family table", "", *lines]
    _plot_family({short(n): r.per_t() for n, r in ranked}, any_run.per_t("gd1"), any_run.per_t("ridge"),
                 out / "family_per_t.png", f"family: one layer each, {any_run.setting()}")
    row.figures.append("family_per_t.png")
    return _flag(row, list(runs.values()))


# --------------------------------------------------------------------------------------------- figures ---
def _draw_curves(ax, curves: dict[str, np.ndarray], title: str, xlabel: str = "context pairs t") -> None:
    """Per-t loss curves on a log axis: baselines (names starting GD / ridge / least / predict) dashed, the mean
    in each label."""
    for i, (name, c) in enumerate(curves.items()):
        ax.plot(np.arange(len(c)), c, "--" if name.startswith(("GD", "ridge", "least", "predict")) else "-",
                color=f"C{i % 10}", label=f"{name} ({np.mean(c):.3g})")
    ax.set_yscale("log")
    ax.set(xlabel=xlabel, ylabel="loss ½‖ŝ − s‖²", title=title)
    ax.title.set_fontsize(9)


def _plot_curves(curves: dict[str, np.ndarray], path: Path, title: str, xlabel: str = "context pairs t") -> None:
    from mesagen.runtime.figures import plt
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=110)
    _draw_curves(ax, curves, title, xlabel)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_family(curves: dict[str, np.ndarray], gd1: np.ndarray, ridge: np.ndarray, path: Path, title: str) -> None:
    """Per-t loss of every family layer (solid; ten hues, then their light variants) with GD-1 and ridge (dashed, black / grey)."""
    from mesagen.runtime.figures import plt
    fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
    cmap = plt.get_cmap("tab20")
    order = list(range(0, 20, 2)) + list(range(1, 20, 2))     # the ten dark hues first, then their light ones
    for i, (name, c) in enumerate(curves.items()):
        ax.plot(np.arange(len(c)), c, "-", color=cmap(order[i % 20]), lw=1.4, label=f"{name} ({np.mean(c):.3g})")
    ax.plot(np.arange(len(gd1)), gd1, "--", color="k", lw=1.6, label=f"GD-1, tuned η ({np.mean(gd1):.3g})")
    ax.plot(np.arange(len(ridge)), ridge, "--", color="0.45", lw=1.6, label=f"ridge, tuned λ ({np.mean(ridge):.3g})")
    ax.set_yscale("log")
    ax.set(xlabel="context pairs t", ylabel="loss ½‖ŝ − s‖²", title=title)
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="mean loss", title_fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_blocks(kq: np.ndarray, pv: np.ndarray, dim: int, path: Path) -> None:
    from mesagen.runtime.figures import plt
    h = kq.shape[0]
    fig, axes = plt.subplots(2, h, figsize=(3.2 * h, 6.2), dpi=110, squeeze=False)
    for j in range(h):
        for i, (m, name) in enumerate(((kq[j], "W_KQ (key rows × query cols)"), (pv[j], "W_PV (value rows × out cols)"))):
            lim = np.abs(m).max() or 1.0
            ax = axes[i, j]
            ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim)
            for b in range(1, m.shape[0] // dim):
                ax.axhline(b * dim - 0.5, color="k", lw=0.5)
                ax.axvline(b * dim - 0.5, color="k", lw=0.5)
            ax.set_title(f"head {j}: {name}", fontsize=7)
            ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle("claim 1: trained 1-layer linear model; slots [0 | s_t | s_t | s_{t-1}]", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_probes(r2: dict[str, np.ndarray], path: Path) -> None:
    from mesagen.runtime.figures import plt
    fig, axes = plt.subplots(1, len(r2), figsize=(5.5 * len(r2), 4), dpi=110, squeeze=False)
    for ax, (name, r) in zip(axes[0], r2.items()):
        for layer, c in enumerate(r):
            ax.plot(np.arange(len(c)), c, color=f"C{layer % 10}", label=f"layer {layer}")
        ax.set(xlabel="context pairs t", ylabel="probe R² (held-out sequences)", title=f"probe target {name}",
               ylim=(-0.1, 1.02))
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle("claim 4: linear probes of the residual stream by layer and t", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------------------------- driver ----
def _select(only: str | None) -> set[str]:
    if only is None:
        return set(CLAIMS)
    key = only.lower().removeprefix("claim").strip()
    if key not in CLAIMS:
        raise ValueError(f"--only: unknown claim {only!r}; known: {', '.join(CLAIMS)}")
    return {key}


def _train_in_worker(name: str, budget: Budget, runs_dir: str) -> float:
    """Worker of :func:`train_runs`: :func:`_train_run`, its progress lines prefixed with the run name; the wall
    seconds (the state stays in the worker: the run folder holds it)."""
    return _train_run(name, budget, Path(runs_dir), lambda m: print(f"[{name}] {m}", flush=True))[1]


def train_runs(names: list[str], budgets: dict[str, Budget], runs_dir: Path, jobs: int, log=print) -> set[str]:
    """Train the unfinished runs among ``names`` in ``jobs`` worker processes at once, longest first
    (:func:`one_core_estimate`), so that a machine with several cores trains independent runs side by side.

    Each worker is a fresh (``spawn``) Python process with its own JAX CPU client; with the one-thread XLA:CPU
    pool ``import mesagen`` sets on affected jaxlibs (:mod:`mesagen._xla_cpu`) each trains on one core, so
    ``jobs`` = the core count keeps every core busy. A run is trained exactly as :func:`get_run` would train it
    (same config, same folder); runs already finished (:func:`finished`) are skipped. A worker that fails is
    logged and its run left for :func:`get_run` to train (or fail) in this process.

    Args:
        names: run names (those without a budget are ignored).  budgets: :data:`FULL` or :data:`QUICK`.
        runs_dir: the runs folder.  jobs: worker processes (≥ 1).  log: progress lines.

    Returns:
        The names trained here.

    Raises:
        ValueError: ``jobs`` < 1.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    if jobs < 1:
        raise ValueError(f"--jobs {jobs}: need at least 1")
    todo = []
    for n in dict.fromkeys(names):
        if n in budgets:
            config = run_config(n, budgets[n])
            if not finished(runs_dir / config.name, config):
                todo.append(n)
    todo.sort(key=lambda n: -one_core_estimate({n: budgets[n]}))
    done: set[str] = set()
    if not todo:
        return done
    log(f"reproduce: training {len(todo)} runs in {min(jobs, len(todo))} worker processes: {', '.join(todo)}")
    with ProcessPoolExecutor(min(jobs, len(todo)), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_train_in_worker, n, budgets[n], str(runs_dir)): n for n in todo}
        for future in as_completed(futures):
            n = futures[future]
            try:
                log(f"reproduce: {n} trained in {future.result():.0f} s (worker)")
                done.add(n)
            except Exception as exc:  # noqa: BLE001 - the other runs go on; get_run retries this one
                log(f"reproduce: training {n} in a worker failed: {type(exc).__name__}: {exc}")
    return done


def reproduce(out: str | Path = "paper_results", *, quick: bool = False, only: str | None = None,
              jobs: int = 1, log=print) -> list[Row]:
    """Run the experiments of the selected claims and write ``OUT/PAPER_RESULTS.md`` with its figures.

    Args:
        out: output folder (the table, PNG figures; runs under ``OUT/runs``).
        quick: tiny budgets, expensive models skipped (numbers not meaningful; a smoke run).
        only: one claim id of :data:`CLAIMS` (``"2"``, ``"claim2"``, ``"family"``); others become "not run".
        jobs: worker processes that train the selected claims' runs side by side before the analyses
            (:func:`train_runs`); 1 trains each run in this process when a claim first needs it.
        log: where progress lines go.

    Returns:
        The rows written, in :data:`CLAIMS` order.

    Raises:
        ValueError: ``only`` names no claim, or ``jobs`` < 1. ConfigError / LayerLoadError: a shipped config or
            generated layer is missing or invalid.
    """
    selected = _select(only)
    if jobs < 1:
        raise ValueError(f"--jobs {jobs}: need at least 1")
    out = Path(out)
    runs_dir = out / "runs"
    out.mkdir(parents=True, exist_ok=True)
    budgets = QUICK if quick else FULL
    wall0, cpu0, children0 = time.perf_counter(), time.process_time(), _children_cpu()
    cache: dict[str, Run] = {}
    skipped = {}

    def need(name: str) -> Run | None:
        if name not in budgets:
            skipped[name] = "--quick skips it (compile cost)" if quick else "no budget"
            return None
        if name not in cache:
            cache[name] = get_run(name, budgets[name], runs_dir, log)
            if name in pretrained:              # trained by this invocation's workers
                cache[name].reused = False
        return cache[name]

    def deps(claim: str) -> list[str]:
        return {"1": ["linear_1layer"], "2": ["mesa_1layer", "linear_1layer"],
                "3": ["linear_1layer", "linear_2layer", "linear_4layer", "linear_6layer", "mesa_1layer"],
                "4": ["linear_6layer", "linear_4layer", "linear_2layer"], "5": ["softmax_7layer", "softmax_3layer"],
                "6": [*CLAIM6_MODELS, "linear_6layer", *(f"{m}@{k}" for m in CLAIM6_MODELS for k in TASK_FAMILIES)],
                "7": ["mesa_1layer"], "8": ["fixed_teacher"], "9": list(LM_RUNS),
                "family": [r for n in FAMILY for r in family_run_names(n)]}[claim]

    pretrained: set[str] = set()
    if jobs > 1:
        pretrained = train_runs([n for c in CLAIMS if c in selected for n in deps(c)], budgets, runs_dir, jobs, log)
    rows: dict[str, Row] = {}
    builders = {
        "1": lambda: claim1(need("linear_1layer"), out) if need("linear_1layer") else None,
        "2": lambda: claim2(need("mesa_1layer"), need("linear_1layer"), out) if need("mesa_1layer") else None,
        "3": lambda: _claim3(need, out, quick),
        "4": lambda: _claim4(need, out),
        "5": lambda: _claim5(need, quick),
        "6": lambda: _claim6(need, out),
        "7": lambda: claim7(need("mesa_1layer"), out, quick) if need("mesa_1layer") else None,
        "8": lambda: claim8(need("fixed_teacher")) if need("fixed_teacher") else None,
        "9": lambda: claim9({n: need(n) for n in LM_RUNS}) if all(n in budgets for n in LM_RUNS) else None,
        "family": lambda: _family(need, out, log),
    }
    earlier = _load_rows(out, quick) if only else {"rows": {}, "runs": {}}
    kept = []
    for claim in CLAIMS:
        if claim not in selected:
            if claim in earlier["rows"]:
                rows[claim] = Row(**earlier["rows"][claim])
                kept.append(claim)
            else:
                rows[claim] = _not_run(claim, f"not selected (--only {only})")
            continue
        try:
            row = builders[claim]()
        except Exception as exc:  # noqa: BLE001 - one broken analysis must not lose the other rows of a long run
            import traceback
            traceback.print_exc()
            row = _not_run(claim, f"the analysis failed: {type(exc).__name__}: {exc}")
        if row is None:
            for n in deps(claim):
                if n not in budgets:
                    skipped[n] = "--quick skips it (compile cost)" if quick else "no budget"
            why = "; ".join(f"{n}: {skipped[n]}" for n in deps(claim) if n in skipped) or "not run"
            row = _not_run(claim, why)
        rows[claim] = row
        log(f"reproduce: claim {claim}: {row.status}")
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0 + _children_cpu() - children0
    trained = [n for n, r in cache.items() if not r.reused]
    here = _provenance(wall, cpu, only, jobs)
    for claim in CLAIMS:
        if claim not in kept:
            rows[claim].provenance = here
    lines = {**earlier["runs"], **{n: run_line(n, r) for n, r in cache.items()}}
    write_table(out / "PAPER_RESULTS.md", [rows[c] for c in CLAIMS], quick=quick, wall_s=wall, cpu_s=cpu,
                trained=trained, reused=[n for n in cache if n not in trained], runs=lines, kept=kept, jobs=jobs)
    _save_rows(out, quick, rows, lines)
    log(f"reproduce: wrote {out / 'PAPER_RESULTS.md'} ({wall:.0f} s wall, {cpu:.0f} s CPU)")
    return [rows[c] for c in CLAIMS]


def _claim3(need, out: Path, quick: bool) -> Row | None:
    depth = {d: need(n) for d, n in ((1, "linear_1layer"), (2, "linear_2layer"), (4, "linear_4layer"),
                                     (6, "linear_6layer"))}
    depth = {d: r for d, r in depth.items() if r is not None}
    if len(depth) < 2:
        return None
    return claim3(depth, need("mesa_1layer"), out, k_max=8 if quick else 40, quick=quick)


def _claim4(need, out: Path) -> Row | None:
    for name in ("linear_6layer", "linear_4layer", "linear_2layer"):
        run = need(name)
        if run is not None:
            return claim4(run, out)
    return None


#: Claim 6's row labels of the run names.
CLAIM6_LABELS = {"hybrid_softmax_mesa": "hybrid", "softmax_7layer": "softmax 7L",
                 "mesa_1layer": "mesa 1L (constructed)", "linear_6layer": "linear 6L (constructed)"}


def _claim5(need, quick: bool) -> Row | None:
    runs = {d: need(n) for d, n in ((3, "softmax_3layer"), (7, "softmax_7layer"))}
    runs = {d: r for d, r in runs.items() if r is not None}
    return claim5(runs, k_max=8 if quick else 40, distill=lambda r: distill_softmax(r, quick)) if runs else None


def _claim6(need, out: Path) -> Row | None:
    by_task = {}
    for kind, suffix, names in (("fully_observed", "", (*CLAIM6_MODELS, "linear_6layer")),
                                *((k, f"@{k}", CLAIM6_MODELS) for k in TASK_FAMILIES)):
        models = {CLAIM6_LABELS[n]: need(n + suffix) for n in names}
        models = {label: r for label, r in models.items() if r is not None}
        if "hybrid" in models:
            by_task[kind] = models
    return claim6(by_task, out) if by_task else None


def _family(need, out: Path, log) -> Row | None:
    runs, tried = {}, {}
    for n in FAMILY:
        got = [(scale, need(r)) for scale, r in zip(FAMILY_LR_SCALES, family_run_names(n))]
        got = [(scale, r) for scale, r in got if r is not None]
        if got:
            tried[f"family_{n}"] = {scale: (r.final_train_loss(), r.mean()) for scale, r in got}
            runs[f"family_{n}"] = min(got, key=lambda x: tried[f"family_{n}"][x[0]][0])[1]
    return family_row(runs, out, log=log, lr_tried=tried) if runs else None


_STATEMENTS = {
    "1": ("One linear SA layer on constructed tokens converges to GD-1 with a learned step size; weights show the "
          "GD construction's block structure.", "model ≈ GD-1 (mean ≈ 0.899)"),
    "2": ("One mesa layer strongly outperforms one linear layer and behaves like ridge regression (mean within 5 % "
          "of ridge, within 3× at every t ≥ 10).", "mesa ≈ ridge (≈ 0.19 vs 0.184)"),
    "3": ("Deeper linear models approach, but do not reach, one mesa layer; per-t loss follows k steps of "
          "Prop. 2.", "monotone in depth, above mesa"),
    "4": ("Linear probes decode s_{t+1} and (S Sᵀ + λI)⁻¹ s_t better with depth and with t.", "R² rises"),
    "5": ("In softmax models the first layer binds tokens; later layers behave like linear attention.",
          "s_{t−1} decodable after layer 1"),
    "6": ("The 2-layer hybrid (softmax, then mesa) is the strongest model on all three task families.",
          "hybrid best"),
    "7": ("Models trained only on dynamics do few-shot regression when prompted.", "loss falls with pairs"),
    "8": ("Fixed teacher: a 1-layer model beats GD-1 by memorising W*, with no mesa signature.", "model < GD-1"),
    "9": ("Language modelling: softmax-then-mesa beats softmax-then-linear and nearly matches softmax.",
          "qualitative (appendix)"),
    "family": ("(mesagen, not in the paper) every shipped layer as one layer at one budget: the mesa layer (ridge) "
               "has the lowest mean loss of the family.", "–"),
}


def _children_cpu() -> float:
    """CPU seconds (user + system) of this process's finished child processes (:func:`train_runs`' workers)."""
    import resource
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _provenance(wall_s: float, cpu_s: float, only: str | None, jobs: int = 1) -> str:
    """One line naming an invocation: date, its options, wall and CPU time, cores, jax version and backend."""
    dev = jax.devices()[0]
    opts = (f" --only {only}" if only else "") + (f" --jobs {jobs}" if jobs > 1 else "")
    return (f"{time.strftime('%Y-%m-%d', time.gmtime())}, `mesagen reproduce{opts}`: "
            f"wall {wall_s:.0f} s, CPU {cpu_s:.0f} s on {os.cpu_count()} visible cores; jax {jax.__version__}, "
            f"backend {jax.default_backend()} ({dev.device_kind})")


#: Every row and run line of the last table, so that ``--only`` rewrites one claim and keeps the others.
ROWS_FILE = "claims.json"


def _save_rows(out: Path, quick: bool, rows: dict[str, Row], runs: dict[str, str]) -> None:
    """Write ``OUT/claims.json`` (the rows as dicts, the runs table's lines) atomically."""
    from dataclasses import asdict
    tmp = out / f".{ROWS_FILE}.tmp"
    tmp.write_text(json.dumps({"quick": quick, "rows": {c: asdict(r) for c, r in rows.items()}, "runs": runs},
                              indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(out / ROWS_FILE)


def _load_rows(out: Path, quick: bool) -> dict:
    """The rows and run lines of ``OUT/claims.json`` when it was written in the same mode (quick or full) and
    every row is a real result; otherwise none (``{"rows": {}, "runs": {}}``)."""
    path = out / ROWS_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"rows": {}, "runs": {}}
    if data.get("quick") != quick:
        return {"rows": {}, "runs": {}}
    rows = {c: r for c, r in data.get("rows", {}).items() if c in CLAIMS and r.get("status") != "not run"}
    runs = {n: re.sub(r"\| (trained|reused) \|$", "| earlier invocation |", line)
            for n, line in data.get("runs", {}).items()}
    return {"rows": rows, "runs": runs}


def _not_run(claim: str, why: str) -> Row:
    statement, paper = _STATEMENTS[claim]
    return Row(claim, statement, paper, measured=f"not run: {why}", status="not run")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def run_line(name: str, r: Run) -> str:
    """One row of the runs table: model, budget, training wall time, steps/s, mean held-out loss (nats per byte
    for text runs), the baselines' (dynamics runs only), and whether this invocation trained or reused it."""
    w, sps = r.result.get("wall_s"), r.result.get("steps_per_s")
    base = {b: (_f(r.mean(b)) if b in r.result.get("mean", {}) else "–") for b in ("ridge", "gd1")}
    return (f"| {name} | {r.result.get('model', '')} | {r.config.train.steps} × {r.config.train.batch_size} | "
            f"{f'{w:.0f}' if w else '?'} | {f'{sps:.1f}' if sps else '?'} | {_f(r.mean())} | {base['ridge']} | "
            f"{base['gd1']} | {'reused' if r.reused else 'trained'} |")


def write_table(path: Path, rows: list[Row], *, quick: bool, wall_s: float, cpu_s: float, trained: list[str],
                reused: list[str], runs: dict[str, str] | None = None, kept: list[str] = (), jobs: int = 1) -> None:
    """Write ``PAPER_RESULTS.md``: header (mode, wall and CPU time, machine), the claims table, the runs (one
    :func:`run_line` each), notes and figures. ``kept``: claims whose rows come from an earlier invocation;
    ``jobs``: the invocation's training worker processes (:func:`train_runs`)."""
    lines = ["# The paper's claims, reproduced", "",
             "von Oswald et al., *Uncovering mesa-optimization algorithms in Transformers* (arXiv 2309.05858); "
             "claims as in docs/paper.md §6. Written by `mesagen reproduce" + (" --quick" if quick else "")
             + (f" --jobs {jobs}" if jobs > 1 else "") + "`.", ""]
    if quick:
        lines += ["**Quick run**: tiny budgets (a few steps on a few sequences) and the expensive models skipped — "
                  "the numbers below are **not meaningful** at this budget; the run only checks the pipeline.", ""]
    dev = jax.devices()[0]
    if not quick:
        lines += [f"Budgets sized for one CPU core: training all runs takes about "
                  f"{one_core_estimate(FULL) / 60:.0f} minutes of one unloaded core of this project's 2-core machine "
                  "(measured steps/s per model, `CPU_STEPS_PER_S` in mesagen/runtime/reproduce.py).", ""]
    lines += [f"Wall time {wall_s:.0f} s, CPU time {cpu_s:.0f} s (all threads of the process and of its training workers) on {os.cpu_count()} "
              f"visible cores; jax {jax.__version__}, backend {jax.default_backend()} ({dev.device_kind}). Trained: "
              f"{', '.join(trained) or 'none'}; reused finished runs: {', '.join(reused) or 'none'}. Losses are "
              "½ Σ_d (ŝ − s)², mean over the held-out sequences (`eval.batch`: 1024, 64 in a quick run) and "
              "positions t = 0…49; "
              "ridge and GD-1 are tuned on other sequences. One seed per setting." +
              (f" Rows of claims {', '.join(kept)} (and their runs) are kept from earlier invocations "
               f"(`{ROWS_FILE}`); the times above are this invocation's." if kept else ""), "",
             "| claim | paper's statement | paper | measured | setting (steps × batch, seed) | status | figures |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        figs = " ".join(f"[{f}]({f})" for f in r.figures) or "–"
        lines.append(f"| {r.claim} | {_cell(r.statement)} | {_cell(r.paper)} | {_cell(r.measured)} | "
                     f"{_cell(r.setting)} | {r.status} | {figs} |")
    if runs:
        lines += ["", "## Runs", "", "| run | model | steps × batch | training wall (s) | steps/s | mean loss | "
                  "ridge | GD-1 | this invocation |", "|---|---|---|---|---|---|---|---|---|"]
        lines += list(runs.values())
    origins: dict[str, list[str]] = {}
    for r in rows:
        if r.provenance and r.status != "not run":
            origins.setdefault(r.provenance, []).append(r.claim)
    if kept and origins:
        lines += ["", "## Provenance", "", "Which invocation computed which rows:", "",
                  *[f"- claims {', '.join(cs)}: {p}" for p, cs in origins.items()]]
    notes = [f"- **{r.claim}**: {r.note}" for r in rows if r.note]
    if notes:
        lines += ["", "## Notes", "", *notes]
    for r in rows:
        if r.sections:
            lines += ["", *r.sections]
    figs = [f for r in rows for f in r.figures]
    if figs:
        lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figs]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
