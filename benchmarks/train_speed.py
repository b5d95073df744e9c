"""Training steps per second of the one-mesa-layer model: generated ridge layer vs a hand-written JAX model.

    PYTHONPATH=. python3 benchmarks/train_speed.py [--steps N] [--batch B] [--variants recurrent,chunked,...]

Model (paper Table 1, "mesa, constructed"): constructed tokens (d = 40 = 4 D), 1 mesa layer, 2 heads, key and
value size 20, no LN / MLP / bias, activations clipped to [-4, 4], batch 256, T = 50. Every variant runs one
jitted step of the same work: sample a batch of linear-dynamics sequences, forward, backward, AdamW update.

* ``generated ridge (FORM)``, one per form of ``generated/ridge/layer_jax.py`` (``FORMS``: recurrent, closed_form,
  chunked): mesagen's trainer (:class:`mesagen.runtime.train.Trainer`) on ``configs/mesa_1layer.yaml`` at this
  batch, JAX backend; ``generated ridge (recurrent, numba_cpu)``: the same with ``backend: numba_cpu`` (the
  Numba CPU module's forward and backward through host callbacks, :mod:`mesagen.runtime.numba_bridge`; CPU only).
* ``hand-written``: plain JAX, parameters in a dict, the mesa layer as a ``lax.scan`` over t of the
  Sherman–Morrison update P_t = P_{t-1} − P_{t-1} k kᵀ P_{t-1} / (1 + kᵀ P_{t-1} k), P_0 = I / λ, S_t = S_{t-1} + v kᵀ,
  o_t = S_t P_t q_t, differentiated by plain autodiff through the scan; optax AdamW with the same schedule
  and weight decay (no per-parameter learning-rate scale: the trainer's λ × 100 is one more elementwise op).

Before timing, the hand-written forward is checked against the trainer's model on the same weights. Compilation
is timed separately; ratios are to the hand-written model from the same run.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import optax

from mesagen.data import constructed_tokens, sample_states
from mesagen.runtime.config import RunConfig, load_config
from mesagen.runtime.train import Trainer, make_schedule, paper_loss


def mesa_config(form: str, batch: int, backend: str = "jax") -> RunConfig:
    """``configs/mesa_1layer.yaml`` with the ridge block in ``form`` on ``backend`` (``jax`` / ``numba_cpu``) and
    ``batch`` sequences per step."""
    cfg = load_config("configs/mesa_1layer.yaml").model_dump()
    cfg["model"]["blocks"] = [{"layer": "generated:ridge", "form": form, "backend": backend}]
    cfg["train"].update(batch_size=batch, progress=False)
    cfg["eval"].update(batch=8, tune_batch=8)
    return RunConfig.model_validate(cfg)


def hand_forward(p: dict, tokens: jax.Array, out_dim: int, clip: float) -> jax.Array:
    """Plain-JAX mesa model: ``tokens [B, T, d] -> predictions [B, T, D]`` (Sherman–Morrison in ``lax.scan``)."""
    q = jnp.einsum("btd,dhk->bthk", tokens, p["wq"])
    k = jnp.einsum("btd,dhk->bthk", tokens, p["wk"])
    v = jnp.einsum("btd,dhv->bthv", tokens, p["wv"])
    lam = jnp.exp(p["raw_lam"])                                           # [H]
    b, _, h, dk = q.shape
    p0 = jnp.eye(dk, dtype=q.dtype)[None, None] / lam[None, :, None, None] * jnp.ones((b, h, 1, 1), q.dtype)
    s0 = jnp.zeros((b, h, v.shape[-1], dk), q.dtype)

    def step(carry, x):
        pm, s = carry
        qt, kt, vt = x
        pk = jnp.einsum("bhij,bhj->bhi", pm, kt)
        pm = pm - pk[..., :, None] * pk[..., None, :] / (1.0 + jnp.einsum("bhi,bhi->bh", kt, pk))[..., None, None]
        s = s + vt[..., :, None] * kt[..., None, :]
        return (pm, s), jnp.einsum("bhvk,bhk->bhv", s, jnp.einsum("bhij,bhj->bhi", pm, qt))

    _, o = jax.lax.scan(step, (p0, s0), tuple(jnp.moveaxis(a, 1, 0) for a in (q, k, v)))
    x = tokens + jnp.einsum("tbhv,hvd->btd", o, p["wo"])
    return jnp.clip(x, -clip, clip)[..., :out_dim]


def hand_params(model) -> dict:
    """The trainer model's weights as the hand-written model's parameter dict."""
    a = model.blocks[0].attn
    return {"wq": a.wq, "wk": a.wk, "wv": a.wv, "wo": a.wo, "raw_lam": a.raw_params["lam"]}


def time_steps(step, state, steps: int) -> tuple[float, float]:
    """(compile seconds, steps per second) of ``state = step(state)``."""
    t0 = time.perf_counter()
    state = step(state)
    jax.block_until_ready(state)
    compile_s = time.perf_counter() - t0
    state = step(state)                      # a second warm-up call: any retrace happens here, not in the timing
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for _ in range(steps):
        state = step(state)
    jax.block_until_ready(state)
    return compile_s, steps / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--variants", default=None,
                        help="comma-separated generated variants to time: forms of generated/ridge (recurrent, "
                             "closed_form, chunked) and numba_cpu (default: every form, and numba_cpu on a CPU)")
    args = parser.parse_args()
    from mesagen.runtime.loader import load_layer_module, resolve_layer_path
    forms = tuple(load_layer_module(resolve_layer_path("generated:ridge")).FORMS)
    known = forms + ("numba_cpu",)
    variants = known if args.variants is None else tuple(v.strip() for v in args.variants.split(",") if v.strip())
    if args.variants is None and jax.default_backend() != "cpu":
        variants = forms
    bad = [v for v in variants if v not in known]
    if bad:
        parser.error(f"--variants: unknown {bad}; known: {', '.join(known)}")
    cfg = mesa_config("recurrent", args.batch)
    d, clip = cfg.task.observed_dim, cfg.model.clip_activations

    # hand-written model on the trainer's initial weights; check it computes the same function
    ref = Trainer(cfg)
    model = ref.initial_state().model
    params = hand_params(model)
    tok, _ = constructed_tokens(sample_states(jax.random.PRNGKey(1), cfg.task, 8))
    err = float(jnp.max(jnp.abs(hand_forward(params, tok, d, clip) - model(tok))))
    opt = optax.adamw(make_schedule(cfg.train.schedule, cfg.train.steps), weight_decay=cfg.train.weight_decay,
                      mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p))

    @jax.jit
    def hand_step(carry):
        p, o, i = carry
        states = sample_states(jax.random.fold_in(jax.random.PRNGKey(0), i), cfg.task, args.batch)
        x, y = constructed_tokens(states)
        loss, g = jax.value_and_grad(lambda pp: paper_loss(hand_forward(pp, x, d, clip), y))(p)
        u, o = opt.update(g, o, p)
        return optax.apply_updates(p, u), o, (i + 1).astype(jnp.int32)

    rows = [("hand-written lax.scan Sherman–Morrison", *time_steps(hand_step, (params, opt.init(params), jnp.int32(0)),
                                                                   args.steps))]
    for variant in variants:
        form, backend = ("recurrent", "numba_cpu") if variant == "numba_cpu" else (variant, "jax")
        trainer = Trainer(mesa_config(form, args.batch, backend))
        label = f"generated ridge ({form}{', numba_cpu' if backend == 'numba_cpu' else ''})"
        rows.append((label, *time_steps(lambda s: trainer.step(s)[0], trainer.initial_state(), args.steps)))
    print(f"{jax.default_backend()} ({jax.devices()[0].device_kind}), B={args.batch} T={cfg.task.seq_len} d=40, "
          f"1 mesa layer x 2 heads x key 20, {args.steps} timed steps; hand-written vs trainer forward: "
          f"max |diff| {err:.1e}")
    print("| model | compile (s) | steps/s | ÷ hand-written |\n|---|---|---|---|")
    base = rows[0][2]
    for name, c, sps in rows:
        print(f"| {name} | {c:.1f} | {sps:.2f} | {sps / base:.2f}× |")


if __name__ == "__main__":
    main()
