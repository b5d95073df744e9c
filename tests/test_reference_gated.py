"""Tests of the gated float64 references (mesagen.reference.gated) and their hand-derived VJPs.

Sizes are small distinct primes with ``K != V`` so a transposed axis cannot go unnoticed: B=2, T=7, H=2, K=3,
V=5. Gates vary over time, are never identically 1, and include strongly decaying tokens (alpha = e^-8).
"""

from __future__ import annotations

import numpy as np
import pytest

from mesagen import reference as ref

B, T, H, K, V = 2, 7, 2, 3, 5
LINEAR = ("simple_gla", "retention", "gla")
DELTA = ("gated_delta", "kda")
ALL = LINEAR + DELTA
GATES = {"simple_gla": ("g",), "retention": ("gamma",), "gla": ("g",), "gated_delta": ("g", "beta"),
         "kda": ("g", "beta")}
STATE = {"simple_gla": "kv", "retention": "kv", "gla": "kv", "gated_delta": "S", "kda": "S"}
DEFAULT_SPACE = {"simple_gla": "log", "retention": "linear", "gla": "log", "gated_delta": "log", "kda": "log"}


def close(a, b, rtol=1e-10):
    """Assert ``a == b`` up to ``rtol`` relative to the largest entry of ``b`` (and shapes equal)."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = max(np.max(np.abs(b)), 1e-300) if b.size else 1.0
    err = np.max(np.abs(a - b)) / scale if b.size else 0.0
    assert err <= rtol, f"relative error {err:.3e} > {rtol:.1e}"


def make_args(name, seed=0, *, beta_per_channel=False, t=T, state=True):
    """Random inputs in the layer's default gate space; ``S0`` is the initial state array."""
    rng = np.random.default_rng(seed)
    args = {"q": rng.standard_normal((B, t, H, K)), "k": rng.standard_normal((B, t, H, K)),
            "v": rng.standard_normal((B, t, H, V))}
    gshape = {"simple_gla": (B, t, H), "gla": (B, t, H, K), "gated_delta": (B, t, H), "kda": (B, t, H, K)}
    if name == "retention":
        args["gamma"] = np.array([0.83, 0.41])                                      # linear space
    else:
        g = -rng.uniform(0.02, 1.5, gshape[name])
        if t > 1:
            g[:, t // 2] = -8.0                                                     # strongly decaying token
        args["g"] = g
    if name in DELTA:
        args["beta"] = rng.uniform(0.1, 0.9, (B, t, H, V) if beta_per_channel else (B, t, H))
    args["S0"] = rng.standard_normal((B, H, K, V)) if state else np.zeros((B, H, K, V))
    return args


def fwd(name, args, **kw):
    f = getattr(ref, name)
    gates = [args[n] for n in GATES[name]]
    return f(args["q"], args["k"], args["v"], *gates, initial_state={STATE[name]: args["S0"]}, **kw)


def vjp(name, args, do, dS, **kw):
    f = getattr(ref, name + "_vjp")
    gates = [args[n] for n in GATES[name]]
    return f(args["q"], args["k"], args["v"], *gates, do, dfinal_state={STATE[name]: dS},
             initial_state={STATE[name]: args["S0"]}, **kw)


def plain_linear_recursion(q, k, v, glog_k, S0, scale):
    """``S_t = Diag(exp(g_t)) S_{t-1} + k_t v_t^T``, ``o_t = S_t^T (scale q_t)`` token by token."""
    o = np.zeros(v.shape)
    S_out = np.zeros(S0.shape)
    for b in range(B):
        for h in range(H):
            S = S0[b, h].copy()
            for t in range(q.shape[1]):
                S = np.exp(glog_k[b, t, h])[:, None] * S + np.outer(k[b, t, h], v[b, t, h])
                o[b, t, h] = S.T @ (scale * q[b, t, h])
            S_out[b, h] = S
    return o, S_out


def gate_per_channel_log(name, args):
    """The layer's log gate as ``[B, T, H, K]`` (for the in-test recursion)."""
    t = args["q"].shape[1]
    if name == "retention":
        return np.broadcast_to(np.log(args["gamma"])[None, None, :, None], (B, t, H, K))
    g = args["g"]
    return g if g.ndim == 4 else np.repeat(g[..., None], K, axis=3)


def l2n(x):
    return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + 1e-6)


# ---------------------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("name", LINEAR)
@pytest.mark.parametrize("scale", [None, 0.7])
def test_linear_explicit_sum_equals_recursion(name, scale):
    args = make_args(name, 1)
    o, st = fwd(name, args, scale=scale)
    o2, S2 = plain_linear_recursion(args["q"], args["k"], args["v"], gate_per_channel_log(name, args), args["S0"],
                                    K ** -0.5 if scale is None else scale)
    close(o, o2)
    close(st["kv"], S2)
    assert np.max(np.abs(o)) > 0.1


@pytest.mark.parametrize("name", DELTA)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("l2", [True, False])
def test_delta_loop_equals_householder_products(name, per_channel, l2):
    args = make_args(name, 2, beta_per_channel=per_channel)
    o, st = fwd(name, args, l2_normalize=l2)
    o2, st2 = fwd(name, args, l2_normalize=l2, form="products")
    close(o, o2)
    close(st["S"], st2["S"])
    assert np.max(np.abs(o)) > 0.1


@pytest.mark.parametrize("name", DELTA)
def test_delta_in_test_recursion(name):
    """The contract's recurrence written here, with l2 normalisation (eps 1e-6) before scale."""
    args = make_args(name, 3, beta_per_channel=True)
    glog = gate_per_channel_log(name, args)
    qn, kn = 0.9 * l2n(args["q"]), l2n(args["k"])
    o_exp = np.zeros((B, T, H, V))
    S_exp = np.zeros((B, H, K, V))
    for b in range(B):
        for h in range(H):
            S = args["S0"][b, h].copy()
            for t in range(T):
                Sp = np.diag(np.exp(glog[b, t, h])) @ S
                S = Sp + np.outer(kn[b, t, h], args["beta"][b, t, h] * (args["v"][b, t, h] - Sp.T @ kn[b, t, h]))
                o_exp[b, t, h] = S.T @ qn[b, t, h]
            S_exp[b, h] = S
    o, st = fwd(name, args, scale=0.9)
    close(o, o_exp)
    close(st["S"], S_exp)


@pytest.mark.parametrize("name", ALL)
def test_log_and_linear_gate_space_agree(name):
    args = make_args(name, 4)
    other = dict(args)
    if name == "retention":
        other["gamma"] = np.log(args["gamma"])
        space = "log"
    else:
        other["g"] = np.exp(args["g"])
        space = "linear"
    o, st = fwd(name, args)
    o2, st2 = fwd(name, other, gate_space=space)
    close(o2, o)
    close(st2[STATE[name]], st[STATE[name]])
    # the VJP in the other space is the chain rule d(log alpha)/d(alpha) = 1 / alpha
    rng = np.random.default_rng(40)
    do, dS = rng.standard_normal(o.shape), rng.standard_normal(st[STATE[name]].shape)
    gname = GATES[name][0]
    d1, d2 = vjp(name, args, do, dS), vjp(name, other, do, dS, gate_space=space)
    lin = args[gname] if name == "retention" else other[gname]
    dlin, dlog = (d1, d2) if name == "retention" else (d2, d1)
    close(dlin[gname] * lin, dlog[gname])
    for key in ("q", "k", "v"):
        close(d2[key], d1[key])


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("split", [1, 3, 6])
def test_continuation_equals_one_call(name, split):
    args = make_args(name, 5, beta_per_channel=(name == "kda"))
    o, st = fwd(name, args)

    def part(sl, S0):
        a = {key: (val[:, sl] if key not in ("gamma", "S0") else val) for key, val in args.items()}
        a["S0"] = S0
        return fwd(name, a)

    o1, st1 = part(slice(0, split), args["S0"])
    o2, st2 = part(slice(split, T), st1[STATE[name]])
    close(np.concatenate([o1, o2], axis=1), o)
    close(st2[STATE[name]], st[STATE[name]])


def test_retention_equals_simple_gla_with_broadcast_log_gamma():
    args = make_args("retention", 6)
    g = np.broadcast_to(np.log(args["gamma"])[None, None, :], (B, T, H)).copy()
    sg = dict(args, g=g)
    o, st = fwd("retention", args)
    o2, st2 = fwd("simple_gla", sg)
    close(o, o2)
    close(st["kv"], st2["kv"])
    rng = np.random.default_rng(60)
    do, dS = rng.standard_normal(o.shape), rng.standard_normal(st["kv"].shape)
    d_ret, d_sg = vjp("retention", args, do, dS), vjp("simple_gla", sg, do, dS)
    close(d_ret["gamma"] * args["gamma"], d_sg["g"].sum(axis=(0, 1)))
    for key in ("q", "k", "v"):
        close(d_ret[key], d_sg[key])
    close(d_ret["initial_state"]["kv"], d_sg["initial_state"]["kv"])


@pytest.mark.parametrize("pair", [("gla", "simple_gla"), ("kda", "gated_delta")])
def test_channel_gate_constant_over_channels_equals_scalar_gate(pair):
    chan, scal = pair
    args = make_args(scal, 7)
    cargs = dict(args, g=np.repeat(args["g"][..., None], K, axis=3))
    o, st = fwd(scal, args)
    o2, st2 = fwd(chan, cargs)
    close(o2, o)
    close(st2[STATE[scal]], st[STATE[scal]])
    rng = np.random.default_rng(70)
    do, dS = rng.standard_normal(o.shape), rng.standard_normal(st[STATE[scal]].shape)
    d1, d2 = vjp(scal, args, do, dS), vjp(chan, cargs, do, dS)
    close(d2["g"].sum(axis=3), d1["g"])
    for key in ("q", "k", "v") + (("beta",) if scal in DELTA else ()):
        close(d2[key], d1[key])


@pytest.mark.parametrize("name", DELTA)
def test_per_channel_beta_constant_over_v_equals_scalar_beta(name):
    args = make_args(name, 8)
    pargs = dict(args, beta=np.repeat(args["beta"][..., None], V, axis=3))
    o, st = fwd(name, args)
    o2, st2 = fwd(name, pargs)
    close(o2, o)
    close(st2["S"], st["S"])
    rng = np.random.default_rng(80)
    do, dS = rng.standard_normal(o.shape), rng.standard_normal(st["S"].shape)
    d1, d2 = vjp(name, args, do, dS), vjp(name, pargs, do, dS)
    assert d2["beta"].shape == (B, T, H, V) and d1["beta"].shape == (B, T, H)
    close(d2["beta"].sum(axis=3), d1["beta"])
    close(d2["g"], d1["g"])


@pytest.mark.parametrize("name", ALL)
def test_single_token_by_hand(name):
    args = make_args(name, 9, t=1)
    sc = 0.6
    q, k, v, S0 = args["q"][:, 0], args["k"][:, 0], args["v"][:, 0], args["S0"]
    alpha = np.exp(gate_per_channel_log(name, args)[:, 0])                          # (B, H, K)
    if name in DELTA:
        q, k = l2n(q), l2n(k)
    Sp = alpha[..., None] * S0
    if name in DELTA:
        beta = args["beta"][:, 0][..., None] if args["beta"].ndim == 3 else args["beta"][:, 0]
        S1 = Sp + k[..., None] * (beta * (v - np.einsum("bhkv,bhk->bhv", Sp, k)))[:, :, None, :]
    else:
        S1 = Sp + k[..., None] * v[:, :, None, :]
    o, st = fwd(name, args, scale=sc)
    close(o[:, 0], np.einsum("bhkv,bhk->bhv", S1, sc * q))
    close(st[STATE[name]], S1)


@pytest.mark.parametrize("name", ALL)
def test_empty_sequence_passes_state_through(name):
    args = make_args(name, 10, t=0)
    o, st = fwd(name, args)
    assert o.shape == (B, 0, H, V)
    close(st[STATE[name]], args["S0"])


@pytest.mark.parametrize("name", ALL)
def test_default_scale_and_zero_state(name):
    args = make_args(name, 11, state=False)
    gates = [args[n] for n in GATES[name]]
    f = getattr(ref, name)
    o, st = f(args["q"], args["k"], args["v"], *gates)
    o2, st2 = fwd(name, args, scale=K ** -0.5)
    close(o, o2)
    close(st[STATE[name]], st2[STATE[name]])
    # o is linear in scale (scale multiplies q after the feature map)
    o3, _ = fwd(name, args, scale=2.5)
    close(o3, 2.5 / K ** -0.5 * o)


def test_l2_normalize_uses_eps_1e6():
    """With ``|k|^2`` comparable to eps, ``phi(k) = k / sqrt(|k|^2 + 1e-6)`` differs visibly from ``k / |k|``."""
    args = make_args("gated_delta", 12, t=1, state=False)
    args["k"] = 1e-3 * args["k"] / np.linalg.norm(args["k"], axis=-1, keepdims=True)      # |k| = 1e-3
    o, _ = fwd("gated_delta", args, scale=1.0)
    kn, qn = l2n(args["k"][:, 0]), l2n(args["q"][:, 0])
    expect = (args["beta"][:, 0] * np.sum(kn * qn, axis=-1))[..., None] * args["v"][:, 0]
    close(o[:, 0], expect)
    assert abs(np.linalg.norm(kn[0, 0]) - 1 / np.sqrt(2)) < 1e-12


@pytest.mark.parametrize("name", ALL)
def test_inputs_not_modified(name):
    args = make_args(name, 13, beta_per_channel=(name == "gated_delta"))
    copies = {key: val.copy() for key, val in args.items()}
    o, st = fwd(name, args)
    rng = np.random.default_rng(130)
    do, dS = rng.standard_normal(o.shape), rng.standard_normal(st[STATE[name]].shape)
    do_c, dS_c = do.copy(), dS.copy()
    vjp(name, args, do, dS)
    for key in args:
        assert np.array_equal(args[key], copies[key]), key
    assert np.array_equal(do, do_c) and np.array_equal(dS, dS_c)


# ---------------------------------------------------------------------------------------------------- VJPs
VJP_CASES = [("simple_gla", {}, False), ("simple_gla", {"gate_space": "linear"}, False),
             ("retention", {}, False), ("retention", {"gate_space": "log"}, False),
             ("gla", {}, False), ("gla", {"scale": 0.8}, False),
             ("gated_delta", {}, False), ("gated_delta", {}, True), ("gated_delta", {"l2_normalize": False}, False),
             ("gated_delta", {"gate_space": "linear", "scale": 1.3}, True),
             ("kda", {}, False), ("kda", {}, True), ("kda", {"l2_normalize": False}, True),
             ("kda", {"gate_space": "linear"}, False)]


def _in_space(name, args, kw):
    """Convert the gate to ``kw["gate_space"]`` when that differs from the layer's default."""
    space = kw.get("gate_space", DEFAULT_SPACE[name])
    if space == DEFAULT_SPACE[name]:
        return args
    gname = GATES[name][0]
    return dict(args, **{gname: np.log(args[gname]) if space == "log" else np.exp(args[gname])})


def _loss_fn(name, args, kw, do, dS):
    def loss(a):
        o, st = fwd(name, a, **kw)
        return float(np.sum(o * do) + np.sum(st[STATE[name]] * dS))
    return loss


@pytest.mark.parametrize("name, kw, per_channel", VJP_CASES)
def test_vjp_matches_finite_differences(name, kw, per_channel):
    args = _in_space(name, make_args(name, 14, beta_per_channel=per_channel), kw)
    rng = np.random.default_rng(141)
    o, st = fwd(name, args, **kw)
    do, dS = rng.standard_normal(o.shape), rng.standard_normal(st[STATE[name]].shape)
    grads = vjp(name, args, do, dS, **kw)
    loss = _loss_fn(name, args, kw, do, dS)
    for key in args:
        def f_of(x, key=key):
            return loss(dict(args, **{key: x}))
        fd = ref.finite_difference_grad(f_of, args[key], eps=1e-6)
        got = grads["initial_state"][STATE[name]] if key == "S0" else grads[key]
        assert got.shape == args[key].shape, key
        assert np.max(np.abs(fd)) > 1e-3, key                                       # a gradient that can fail
        close(got, fd, rtol=1e-6)


@pytest.mark.parametrize("name, kw, per_channel", VJP_CASES)
def test_vjp_inner_product_matches_directional_derivative(name, kw, per_channel):
    args = _in_space(name, make_args(name, 15, beta_per_channel=per_channel), kw)
    rng = np.random.default_rng(151)
    o, st = fwd(name, args, **kw)
    do, dS = rng.standard_normal(o.shape), rng.standard_normal(st[STATE[name]].shape)
    grads = vjp(name, args, do, dS, **kw)
    tangent = {key: rng.standard_normal(val.shape) for key, val in args.items()}
    loss = _loss_fn(name, args, kw, do, dS)
    eps = 1e-6
    plus = loss({key: val + eps * tangent[key] for key, val in args.items()})
    minus = loss({key: val - eps * tangent[key] for key, val in args.items()})
    directional = (plus - minus) / (2 * eps)
    inner = sum(float(np.sum((grads["initial_state"][STATE[name]] if key == "S0" else grads[key]) * tangent[key]))
                for key in args)
    assert abs(inner - directional) <= 1e-6 * max(1.0, abs(directional)), (inner, directional)


@pytest.mark.parametrize("name", ALL)
def test_vjp_without_state_cotangent_or_initial_state(name):
    """``dfinal_state=None`` means a zero cotangent; ``initial_state=None`` means a zero state."""
    args = make_args(name, 16, state=False)
    gates = [args[n] for n in GATES[name]]
    do = np.random.default_rng(160).standard_normal((B, T, H, V))
    d = getattr(ref, name + "_vjp")(args["q"], args["k"], args["v"], *gates, do)
    d2 = vjp(name, args, do, np.zeros((B, H, K, V)))
    for key in ("q", "k", "v") + GATES[name]:
        close(d[key], d2[key])
    close(d["initial_state"][STATE[name]], d2["initial_state"][STATE[name]])


# ---------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("name", ALL)
def test_bad_inputs_raise_value_error_naming_the_argument(name):
    args = make_args(name, 17)
    gname = GATES[name][0]
    bad = []
    if name == "retention":
        bad += [(dict(args, gamma=np.array([1.2, 0.5])), {}, "gamma"),
                (dict(args, gamma=np.array([0.0, 0.5])), {}, "gamma"),
                (dict(args, gamma=np.array([0.1, 0.5])), {"gate_space": "log"}, "gamma"),
                (dict(args, gamma=np.array([0.5, 0.5, 0.5])), {}, "gamma")]
    else:
        g = args["g"]
        pos = g.copy()
        pos[0, 1, 0] = 0.3
        nan = g.copy()
        nan.flat[3] = np.nan
        wrong = g[..., None].repeat(K, axis=-1) if g.ndim == 3 else g[..., 0]
        bad += [(dict(args, g=pos), {}, "g"), (dict(args, g=nan), {}, "g"), (dict(args, g=wrong), {}, "g"),
                (dict(args, g=np.exp(g) * 1.5), {"gate_space": "linear"}, "g"),
                (dict(args, g=np.zeros_like(g)), {"gate_space": "linear"}, "g"),
                (dict(args, g=np.full_like(g, -np.inf)), {}, "g")]
    if name in DELTA:
        b = args["beta"]
        big = b.copy()
        big[1, 2, 1] = 1.5
        bad += [(dict(args, beta=big), {}, "beta"), (dict(args, beta=-b), {}, "beta"),
                (dict(args, beta=np.ones((B, T, H, K))), {}, "beta"),
                (args, {"form": "chunk"}, "form"), (args, {"l2_normalize": "yes"}, "l2_normalize")]
    bad += [(dict(args, q=args["q"][..., :2]), {}, "q"), (dict(args, v=args["v"][:, :3]), {}, "v"),
            (dict(args, S0=args["S0"][..., :2]), {}, "initial_state"),
            (args, {"scale": "big"}, "scale"), (args, {"gate_space": "exp"}, "gate_space")]
    for a, kw, word in bad:
        with pytest.raises(ValueError, match=word):
            fwd(name, a, **kw)
    # the VJP validates the same way, and also its cotangents
    o, st = fwd(name, args)
    dS = st[STATE[name]]
    with pytest.raises(ValueError, match="do"):
        vjp(name, args, o[:, :3], dS)
    with pytest.raises(ValueError, match="dfinal_state"):
        vjp(name, args, o, dS[..., :2])
    f = getattr(ref, name + "_vjp")
    with pytest.raises(ValueError, match="dfinal_state"):
        f(args["q"], args["k"], args["v"], *[args[n] for n in GATES[name]], o, dfinal_state={"wrong": dS})
    with pytest.raises(ValueError, match=gname):
        vjp(name, dict(args, **{gname: -args[gname]}), o, dS)
