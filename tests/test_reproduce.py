"""``mesagen reproduce``: the quick run writes a row per claim; the analyses behind the rows are right."""

import re

import numpy as np
import pytest

from mesagen.cli import main
from mesagen.runtime import analysis
from mesagen.runtime.baselines import gd1
from mesagen.runtime.reproduce import CLAIMS, QUICK

NUMBER = re.compile(r"[-+]?\d+(\.\d+)?(e[-+]?\d+)?")


def _states(b=6, t=9, d=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, (b, t + 1, d))


def test_gd_k_one_step_is_gd1_and_many_steps_approach_least_squares():
    s = _states()
    pred = analysis.gd_k_predictions(s, 0.05, 400)
    np.testing.assert_allclose(pred[0], gd1(s, 0.05), rtol=1e-12, atol=1e-12)
    # GD from 0 converges to the min-norm least-squares solution where the system is determined (t >= D = 3)
    x, y = s[:, :-1], s[:, 1:]
    t = 8
    w = np.linalg.lstsq(x[0, :t], y[0, :t], rcond=None)[0].T
    np.testing.assert_allclose(pred[-1, 0, t], w @ x[0, t], rtol=1e-6, atol=1e-8)


def test_fit_k_recovers_the_k_of_a_gd_curve():
    tune, ev = _states(40, seed=1), _states(40, seed=2)
    etas, per_t = analysis.fit_gd_k(tune, ev, 6)
    assert np.all(etas > 0)
    assert analysis.fit_k(per_t[3], per_t) == (4, 0.0)


def test_block_projection_keeps_an_exact_gd_construction():
    d, h = 3, 2
    kq, pv = np.zeros((h, 4 * d, 4 * d)), np.zeros((h, 4 * d, 4 * d))
    kq[0, 3 * d:, d:2 * d] = 0.7 * np.eye(d)             # key s_{t-1}, query s_t
    pv[0, d:2 * d, :d] = 0.5 * np.eye(d)                 # value s_t -> output slot
    kq[1], pv[1] = kq[0], pv[0]
    pk, pp = analysis.block_project(kq, pv, d, gd_only=True)
    np.testing.assert_allclose(pk, kq)
    np.testing.assert_allclose(pp, pv)
    assert analysis.gd_block_share(kq, pv, d) == 1.0
    noisy = kq + 0.1 * np.random.default_rng(0).normal(size=kq.shape)
    assert analysis.gd_block_share(noisy, pv, d) < 1.0


def test_probe_r2_is_one_for_a_linear_target_and_low_for_noise():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4, 6))
    w = rng.normal(size=(6, 2))
    assert np.all(analysis.probe_r2(x, x @ w, 100) > 0.999)
    assert np.all(analysis.probe_r2(x, rng.normal(size=(200, 4, 2)), 100) < 0.2)
    with pytest.raises(ValueError, match="n_fit"):
        analysis.probe_r2(x, x @ w, 200)


def claim_rows(text: str) -> list[str]:
    """The body rows of the claims table (the first table, headed ``| claim |``)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| claim |")) + 2
    rows = []
    for line in lines[start:]:
        if not line.startswith("| "):
            break
        rows.append(line)
    return rows


@pytest.mark.slow
def test_quick_reproduce_writes_a_row_per_claim(tmp_path):
    # ~60 s of CPU (compiling four small models dominates); minutes of wall time on a loaded machine.
    # --jobs 2: the four runs train in two worker processes first, and count as trained by this invocation
    assert main(["reproduce", "--quick", "--jobs", "2", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "PAPER_RESULTS.md").read_text()
    assert "Quick run" in text and "not meaningful" in text and "`mesagen reproduce --quick --jobs 2`" in text
    trained = re.search(r"Trained: ([^;]+);", text).group(1).split(", ")
    assert sorted(trained) == sorted(QUICK) and "reused finished runs: none" in text
    assert all((tmp_path / "runs" / n / "eval.json").is_file() for n in QUICK)
    rows = claim_rows(text)
    cells = [[c.strip() for c in re.split(r"(?<!\\)\|", r)[1:-1]] for r in rows]
    assert [c[0] for c in cells] == list(CLAIMS)
    for claim, _, _, measured, _, status, figures in cells:
        if measured.startswith("not run"):
            assert status == "not run" and len(measured) > len("not run: ") + 3, (claim, measured)
        else:
            assert NUMBER.search(measured), (claim, measured)
            assert status in ("pass", "fail", "partial"), (claim, status)
        for fig in re.findall(r"\(([^)]+\.png)\)", figures):
            assert (tmp_path / fig).is_file(), fig
    # a second run reuses every finished run instead of retraining, and --only keeps the other claims' rows
    assert main(["reproduce", "--quick", "--only", "2", "--out", str(tmp_path)]) == 0
    again = (tmp_path / "PAPER_RESULTS.md").read_text()
    assert "Trained: none" in again
    assert claim_rows(again)[0] == rows[0] and not rows[0].split("|")[4].strip().startswith("not run")
    assert "kept from earlier invocations" in again
    # a full-mode --only never mixes in rows of a quick run
    from mesagen.runtime.reproduce import _load_rows
    assert _load_rows(tmp_path, quick=False) == {"rows": {}, "runs": {}}
    assert main(["reproduce", "--quick", "--only", "nope", "--out", str(tmp_path)]) == 2
    assert main(["reproduce", "--quick", "--jobs", "0", "--out", str(tmp_path)]) == 2


def test_prop2_contains_gd_and_converges_to_the_ridge_preconditioned_readout():
    s = _states()
    # c = 1, η = 1: exactly k-step GD with step ω
    np.testing.assert_allclose(analysis.prop2_predictions(s, 0.05, 1.0, 1.0, 5),
                               analysis.gd_k_predictions(s, 0.05, 5), rtol=1e-12, atol=1e-14)
    # many Richardson steps: x_k → (A_t + ρI)⁻¹ s_t, ρ = (1 − c)/ω, so ŝ = η C_t (A_t + ρI)⁻¹ s_t
    omega, c, eta = 0.05, 0.99, 0.7
    rho = (1 - c) / omega
    pred = analysis.prop2_predictions(s, omega, c, eta, 3000)[-1]
    x, y = s[:, :-1], s[:, 1:]
    b, t = 2, 6
    a = x[b, :t].T @ x[b, :t] + rho * np.eye(3)
    want = eta * (y[b, :t].T @ x[b, :t]) @ np.linalg.solve(a, x[b, t])
    np.testing.assert_allclose(pred[b, t], want, rtol=1e-8)
    with pytest.raises(ValueError, match="damping"):
        analysis.prop2_predictions(s, 0.05, 1.5, 1.0, 3)


def test_prop2_fit_is_never_worse_than_gd_on_the_tuning_sequences():
    tune = _states(40, seed=1)
    _, gd = analysis.fit_gd_k(tune, tune, 6)
    params, p2 = analysis.fit_prop2_k(tune, tune, 6)
    assert np.all(p2.mean(1) <= gd.mean(1) * (1 + 1e-12))
    assert np.all(params[:, 0] > 0) and np.all((params[:, 1] > 0) & (params[:, 1] <= 1))


def _tiny_ridge_model(steps=40):
    """A 1-layer mesa (generated:ridge) model on constructed tokens (D = 3), trained for a few steps."""
    from mesagen.runtime.config import RunConfig
    from mesagen.runtime.train import Trainer
    cfg = RunConfig.model_validate({
        "name": "tiny_mesa", "task": {"state_dim": 3, "seq_len": 8},
        "model": {"tokens": "constructed", "d_model": 12, "heads": 2, "d_k": 6, "blocks": ["generated:ridge"],
                  "clip_activations": 4.0, "init_std": 0.1},
        "train": {"steps": max(steps, 1), "batch_size": 32, "schedule": {"kind": "constant", "peak_lr": 1e-2},
                  "log_every": 10, "eval_every": 100, "checkpoint_every": 100, "progress": False,
                  "param_lr_scale": {"lam": 10}},
        "eval": {"batch": 32, "tune_batch": 16}})
    trainer = Trainer(cfg)
    state = trainer.initial_state()
    for _ in range(steps):
        state, _ = trainer.step(state)
    return state.model


def test_prompt_tuning_lowers_its_objective_and_is_scored_on_held_out_prompts():
    from mesagen.data import RegressionConfig
    from mesagen.runtime.reproduce import fewshot_prompting
    model = _tiny_ridge_model()
    rc = RegressionConfig(dim=3, num_pairs=4)
    res = fewshot_prompting(model, rc, 24, steps=30, lr=0.05, n_train=16, n_prefix=2)
    for stage in ("eos", "eos_prefix"):
        obj = res["objective"][stage]
        assert obj.shape == (31,) and np.all(np.isfinite(obj))
        assert obj[-1] < obj[0], (stage, obj[0], obj[-1])
    assert res["tokens"]["eos"].shape == (3,) and res["tokens"]["eos_prefix"]["prefix"].shape == (2, 3)
    # the prompts scored are others than those tuned on ...
    (xh, yh), (xt, _) = res["heldout"], res["train"]
    assert xh.shape == (24, 4, 3) and xt.shape == (16, 4, 3)
    assert not np.any(np.all(np.isclose(np.asarray(xh)[:, None], np.asarray(xt)[None]), axis=(2, 3)))
    # ... and the curves are those of the tuned tokens on the held-out prompts
    both = res["tokens"]["eos_prefix"]
    np.testing.assert_allclose(res["curves"]["eos_prefix"],
                               analysis.prompt_pair_losses(model, xh, yh, both["eos"], both["prefix"]), rtol=1e-6)
    np.testing.assert_allclose(res["curves"]["eos"], analysis.prompt_pair_losses(model, xh, yh, res["tokens"]["eos"]),
                               rtol=1e-6)
    assert res["curves"]["plain"].shape == (4,)


def test_regression_prompt_layout():
    x = np.arange(12, dtype=np.float32).reshape(1, 4, 3)
    y = -x
    eos, prefix = np.full(3, 7.0, np.float32), np.full((2, 3), 9.0, np.float32)
    states, off, stride = analysis.regression_prompt_states(x, y, eos, prefix)
    assert (off, stride) == (2, 3) and states.shape == (1, 2 + 12 + 1, 3)
    np.testing.assert_array_equal(states[0, off::stride][:4], x[0])
    np.testing.assert_array_equal(states[0, off + 1::stride][:4], y[0])
    np.testing.assert_array_equal(states[0, off + 2::stride][:4], np.broadcast_to(eos, (4, 3)))
    np.testing.assert_array_equal(states[0, -1], 0.0)
    with pytest.raises(ValueError, match="eos"):
        analysis.regression_prompt_states(x, y, np.zeros(2, np.float32))


def test_mesa_state_space_reads_a_ridge_construction_as_state_space_ridge():
    """Keys 2·s_{t−1}, queries 2·s_t, values s_t: the layer is state-space ridge with λ / σ² = λ / 4 (push-through)."""
    import equinox as eqx
    import jax.numpy as jnp
    from mesagen.runtime.baselines import ridge
    model = _tiny_ridge_model(steps=0)
    attn = model.blocks[0].attn
    d, h = 3, attn.wk.shape[1]
    wk, wq, wv, wo = (np.zeros(a.shape, np.float32) for a in (attn.wk, attn.wq, attn.wv, attn.wo))
    for i in range(d):
        wk[3 * d + i, 0, i] = 2.0                    # key: previous-state slot
        wq[d + i, 0, i] = wq[2 * d + i, 0, i] = 1.0   # query: the two current-state slots, 2 s_t in all
        wv[d + i, 0, i] = 1.0                         # value: s_t
        wo[0, i, i] = 1.0                             # output into the prediction slot
    lam = 0.02
    model = eqx.tree_at(lambda m: (m.blocks[0].attn.wk, m.blocks[0].attn.wq, m.blocks[0].attn.wv, m.blocks[0].attn.wo,
                                   m.blocks[0].attn.raw_params["lam"]), model,
                        (jnp.asarray(wk), jnp.asarray(wq), jnp.asarray(wv), jnp.asarray(wo),
                         jnp.full((h,), np.log(lam), jnp.float32)))
    ss = analysis.mesa_state_space(model.blocks[0].attn, d)
    np.testing.assert_allclose(ss["lam_state"][0], lam / 4, rtol=1e-5)
    assert ss["key_offspan"][0] == 0 and ss["query_offspan"][0] < 1e-6
    from mesagen.data import constructed_tokens
    states = 0.5 * _states(b=4, t=8, d=d, seed=3)
    tokens, _ = constructed_tokens(jnp.asarray(states, jnp.float32))
    np.testing.assert_allclose(np.asarray(model(tokens), np.float64), ridge(states, lam / 4), atol=2e-4)
    with pytest.raises(ValueError, match="4·"):
        analysis.mesa_state_space(model.blocks[0].attn, 4)


def _block_scalar_stack(rng, layers=2, heads=2, n=4, dim=2, scale=0.3):
    """Per layer ``(kq, pv)`` ``[H, d, d]`` made of c·I slot blocks, and their scalars ``[L, H, n, n]``."""
    c_kq, c_pv = (scale * rng.standard_normal((layers, heads, n, n)) for _ in range(2))
    eye = np.eye(dim)
    mats = [(np.stack([np.kron(c_kq[l, h], eye) for h in range(heads)]),
             np.stack([np.kron(c_pv[l, h], eye) for h in range(heads)])) for l in range(layers)]
    return mats, c_kq, c_pv


def test_linear_stack_forward_is_layer_by_layer_and_the_compressed_model_fine_tunes():
    rng = np.random.default_rng(0)
    dim, clip = 2, 4.0
    layers, _, _ = _block_scalar_stack(rng)
    tokens = 0.7 * rng.standard_normal((48, 6, 8))
    # two layers = the one-layer forward applied twice (on the clipped residual stream)
    first = analysis.linear_stack_forward_np(tokens, layers[:1], 8, clip)
    np.testing.assert_allclose(analysis.linear_forward_np(tokens, *layers[0], 8, clip), first, rtol=1e-12)
    np.testing.assert_allclose(analysis.linear_stack_forward_np(tokens, layers, dim, clip),
                               analysis.linear_forward_np(first, *layers[1], dim, clip), rtol=1e-12)
    # targets from the stack itself: block scalars reproduce it exactly (float32 forward vs float64)
    targets = analysis.linear_stack_forward_np(tokens, layers, dim, clip)
    data = (tokens[:32], targets[:32]), (tokens[32:], targets[32:])
    res = analysis.compress_linear_stack(layers, dim, clip, *data, keep=32, steps=0)
    assert res["full"] == 0.0 and res["block_scalar"] < 1e-10 and res["pruned"] == res["block_scalar"]
    # keeping 8 of 32 scalars per head loses something; fine-tuning the 8 wins part of it back on held-out data
    res = analysis.compress_linear_stack(layers, dim, clip, *data, keep=8, steps=150, lr=1e-2, batch=32)
    assert res["pruned"] > 1e-4 and res["compressed"] < res["pruned"], res
    assert res["objective"].shape == (150,) and res["per_t"].shape == (6,)
    assert sum(res["kept_blocks"].values()) == 8 * 2 * 2
    with pytest.raises(ValueError, match="keep"):
        analysis.compress_linear_stack(layers, dim, clip, *data, keep=33)
