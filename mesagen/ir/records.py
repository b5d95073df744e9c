"""IR records: small frozen dataclasses that check their own invariants.

The IR describes one head of a layer in matrix form. Vectors are columns (``k`` is d_k × 1), scalars are
1 × 1 matrices, and every right-hand side is a sympy matrix expression over named symbols. Backends print
these expressions; they never re-derive anything.

Shapes are written with the symbolic dims ``K`` (d_k) and ``V`` (d_v) or the integer 1 (:data:`~mesagen.ir.dims.Dim`).
The records name their parts explicitly -- which assignment holds each state's next value, which the output,
which per-token input is the forget gate -- so no stage re-derives meaning from variable names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy as sp

from mesagen.ir.dims import Dim
from mesagen.ir.dims import check_dim as _check_dim


@dataclass(frozen=True)
class Assign:
    """One single assignment ``target = expr`` of a per-head, per-token program.

    Attributes:
        target: name written (a temporary, ``o``, or ``<state>_new``).
        expr: sympy matrix expression; its free MatrixSymbols are names read.
        shape: (rows, cols) of the result in dims ``K``/``V``/1.
        doc: one line for the comment printed above the generated statement.
    """

    target: str
    expr: sp.Basic
    shape: tuple[Dim, Dim]
    doc: str = ""

    def __post_init__(self) -> None:
        if not self.target.isidentifier():
            raise ValueError(f"Assign target {self.target!r} is not an identifier")
        for d in self.shape:
            _check_dim(d, f"Assign {self.target}")

    @property
    def reads(self) -> tuple[str, ...]:
        """Names of the matrix symbols and scalar symbols read, sorted."""
        names = {s.name for s in self.expr.free_symbols if isinstance(s, (sp.MatrixSymbol, sp.Symbol))}
        names.discard("K")
        names.discard("V")
        return tuple(sorted(names))


@dataclass(frozen=True)
class StateDecl:
    """A recurrent state variable of one head, stored in fla orientation (d_k leading).

    Attributes:
        name: stored name (``S``, ``P``, ``kv``, ``kk``).
        shape: stored (rows, cols), e.g. ("K", "V") for S = Wᵀ.
        init: sympy expression of the default initial value (in parameter symbols), e.g. ``Identity(K)/lam``.
        doc: what the state holds, in math.
    """

    name: str
    shape: tuple[Dim, Dim]
    init: sp.Basic
    doc: str

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"state name {self.name!r} is not an identifier")
        for d in self.shape:
            _check_dim(d, f"state {self.name}")


BACKWARDS = ("checkpointed", "implicit")


@dataclass(frozen=True)
class Recurrence:
    """The recurrent form: per token, ``update`` computes every state's next value; ``readout`` the output.

    The readout reads the *new* states (o_t is answered after token t is absorbed).

    Attributes:
        states: the state declarations.
        update / readout: single-assignment programs.
        next_state: the explicit next-state map, state name → the assignment target holding its next value
            (default ``<state>_new``).
        output: the readout target holding o_t (default ``o``).
        backward: how reverse mode is generated (chosen by the pass ``choose_backward``; see below).
    """

    states: tuple[StateDecl, ...]
    update: tuple[Assign, ...]
    readout: tuple[Assign, ...]
    backward: str = "checkpointed"
    next_state: tuple[tuple[str, str], ...] = ()
    output: str = "o"
    """How reverse mode is generated:

    - ``checkpointed``: reverse-mode autodiff through max(⌈√T⌉, 64)-token rematerialised segments (activation
      memory O(√T); below 64 tokens a plain scan).
    - ``implicit``: the exact ridge solution o_t = C_t A_t⁻¹ q_t differentiated implicitly (one more product
      with the stored inverse per token, no adjoint through the rank-one recursion), with the recurrence
      refactorised from its exact statistics at every segment boundary. Requires a kernel form and the states
      ``(W, P)`` = (C_t A_t⁻¹, A_t⁻¹), in this order.
    """

    def __post_init__(self) -> None:
        if not self.next_state:
            object.__setattr__(self, "next_state", tuple((st.name, f"{st.name}_new") for st in self.states))
        written = [a.target for a in self.update + self.readout]
        if len(written) != len(set(written)):
            dup = sorted({n for n in written if written.count(n) > 1})
            raise ValueError(f"single assignment violated for {dup}")
        if [n for n, _ in self.next_state] != [st.name for st in self.states]:
            raise ValueError("next_state must map every state, in declaration order")
        for st, (_, target) in zip(self.states, self.next_state):
            if target not in written:
                raise ValueError(f"state {st.name!r} has no update {target}")
        if self.output not in [a.target for a in self.readout]:
            raise ValueError(f"readout must assign the output {self.output!r}")
        if self.backward not in BACKWARDS:
            raise ValueError(f"unknown backward {self.backward!r}")
        if self.backward == "implicit" and [(s.name, s.shape) for s in self.states] not in (
                [("W", ("V", "K")), ("P", ("K", "K"))], [("S", ("K", "V")), ("P", ("K", "K"))]):
            raise ValueError("backward 'implicit' needs the states (W [V, K], P [K, K]) = (C A⁻¹, A⁻¹)")

    def new(self, state: str) -> str:
        """The target that holds the next value of ``state``.

        Raises:
            KeyError: ``state`` is not a state of this recurrence.
        """
        return dict(self.next_state)[state]

    @property
    def new_names(self) -> tuple[str, ...]:
        """The next-state targets, in state order."""
        return tuple(t for _, t in self.next_state)


@dataclass(frozen=True)
class Decay:
    """The forget gate of decayed regression weights ω_{t,i} = ∏_{j=i+1}^{t} α_j.

    Attributes:
        gate: the spec's name of the input or parameter (its code symbol is ``USER_PREFIX + gate``).
        source: ``input`` (per token) or ``parameter`` (per head, constant in time).
        per_channel: one gate per key channel (``[B, T, H, K]``, GLA / KDA) instead of one per head.
        space: ``log`` (the input holds g = log α ≤ 0) or ``linear`` (it holds α ∈ (0, 1]).

    Per-head programs always receive α (linear space): the frame converts a log-space gate with exp before the
    recurrence, and the parallel form works with cumulative sums of log α (never long products of α).
    """

    gate: str
    source: str
    per_channel: bool
    space: str

    def __post_init__(self) -> None:
        if self.source not in ("input", "parameter") or self.space not in ("log", "linear"):
            raise ValueError(f"bad decay {self}")
        if self.source == "parameter" and (self.per_channel or self.space != "linear"):
            raise ValueError("a parameter gate is one linear-space decay per head")


@dataclass(frozen=True)
class Accumulator:
    """One running sum of the parallel form: ``name`` = decay-weighted Σ_{i≤t} ``summand``_i.

    Attributes:
        name: ``Cbar`` (the cross sums Σ v kᵀ, V × K) or ``Abar`` (the Gram sums Σ k kᵀ, K × K).
        summand: the per-token term (a matrix expression in k, v and the importance weight).
        shape: its (rows, cols).
        decayed: whether the layer's :class:`Decay` weights it (ω_{t,i}).
    """

    name: str
    summand: sp.Basic
    shape: tuple[Dim, Dim]
    decayed: bool = False

    def __post_init__(self) -> None:
        if self.name not in ("Cbar", "Abar"):
            raise ValueError(f"unknown accumulator {self.name!r} (Cbar, Abar)")


@dataclass(frozen=True)
class KernelForm:
    """The parallel (closed) form shared by every layer whose answer is o_t = C̄_t x_t:

        C̄_t = C̄₀ + Σ_{i≤t} v_i k_iᵀ,   Ā_t = Ā₀ + Σ_{i≤t} k_i k_iᵀ,   x_t = M(Ā_t) q_t,
        o_t = C̄₀ x_t + Σ_{i≤t} v_i (k_iᵀ x_t)                       (quadratic in T).

    Linear attention (M = ηI), k-step GD (M a polynomial) and the mesa layer (M = Ā⁻¹) are all of this
    form (von Oswald et al. 2023, Sec. 3: the mesa layer is attention with preconditioned queries).

    With decayed weights the sums are weighted: C̄_t = ω_{t,0} C̄₀ + Σ_{i≤t} ω_{t,i} v_i k_iᵀ (per key channel,
    ω scales the columns), and likewise Ā_t.

    Attributes:
        accumulators: the running sums (``Cbar``; ``Abar`` unless pruned because nothing reads it).
        stats_from_state: assigns ``C0`` (V×K) and, if uses_gram, ``A0`` (K×K) from the old states.
        precondition: assigns ``x`` (K×1) from ``q``, ``Abar`` (= Ā_t) and parameters.
        state_from_stats: assigns every next state from ``Cbar`` (= C̄_T) and ``Abar`` (= Ā_T).
    """

    accumulators: tuple[Accumulator, ...]
    stats_from_state: tuple[Assign, ...]
    precondition: tuple[Assign, ...]
    state_from_stats: tuple[Assign, ...]

    def __post_init__(self) -> None:
        if "x" not in [a.target for a in self.precondition]:
            raise ValueError("precondition must assign 'x'")
        if [a.name for a in self.accumulators] not in (["Cbar"], ["Cbar", "Abar"]):
            raise ValueError("accumulators must be (Cbar,) or (Cbar, Abar)")

    @property
    def uses_gram(self) -> bool:
        """Whether x depends on Ā (else the Gram sums are skipped once the pass ``prune_dead_states`` ran)."""
        return any("Abar" in a.reads for a in self.precondition)

    @property
    def decayed(self) -> bool:
        """Whether the sums are decay-weighted."""
        return any(a.decayed for a in self.accumulators)

    @property
    def chunkable(self) -> bool:
        """Whether the layer has a chunkwise-parallel form (``form="chunked"``): x_t = M q_t does not read Ā (no
        Gram sums) and the summand of C̄ is linear in v, so o_t = C̄_t x_t is the decayed C̄ entering a chunk applied
        to x_t plus masked in-chunk products, and C̄ alone is carried from chunk to chunk."""
        cbar = next(a for a in self.accumulators if a.name == "Cbar")
        return not self.uses_gram and _linear_in(cbar.summand, "v")

    @property
    def gram_chunkable(self) -> bool:
        """Whether the layer has the exact chunkwise ridge form (``form="chunked"`` over the Gram sums): x_t = Ā_t⁻¹ q_t
        exactly (the preconditioner is the solve with the Gram sums, which hold the regulariser), the summands are
        the rank-one k kᵀ and v kᵀ, and the weights are uniform. Then every position of a chunk solves a rank-C
        update of the Ā entering the chunk, all at once by prefix Woodbury (one K × K and one C × C Cholesky
        factorisation per chunk), and only C̄, Ā are carried from chunk to chunk.

        Decayed weights are not covered here: with Γ_t the gate product within the chunk, Ā_t = Γ_t (Ā_c +
        Σ_{j≤t} k̃_j k̃_jᵀ) for k̃_j = Γ_j^{-1/2} k_j, so the same prefix Woodbury would apply to scaled keys, but
        Γ_j^{-1/2} grows without bound inside a chunk (overflow in float32 once a chunk's log gates sum below about
        −176) and the Woodbury correction then cancels terms 1/Γ_t larger than the answer. Decayed layers
        (``rls_forgetting``) get the form over the statistics instead (:attr:`stats_chunkable`), whose weights
        are all ≤ 1."""
        if not self.uses_gram or self.decayed:
            return False
        x = next(a for a in self.precondition if a.target == "x")
        sums = {a.name: a.summand for a in self.accumulators}
        k, v, q = (sp.MatrixSymbol(n, *s) for n, s in (("k", (_KD, 1)), ("v", (_VD, 1)), ("q", (_KD, 1))))
        abar = sp.MatrixSymbol("Abar", _KD, _KD)
        want = {"x": sp.Inverse(abar) * q, "Abar": k * k.T, "Cbar": v * k.T}
        return len(self.precondition) == 1 and all(
            _same(e, want[n]) for n, e in (("x", x.expr), ("Abar", sums["Abar"]), ("Cbar", sums["Cbar"])))


    @property
    def stats_chunkable(self) -> bool:
        """Whether the layer has the chunkwise form over the running statistics (``form="chunked"`` for a kernel
        form that reads the Gram sums and is not :attr:`gram_chunkable`: decayed or importance-weighted ridge
        solves, a regulariser that decays with the data or not, conjugate-gradient solves, k-step GD
        polynomials). Needs C̄'s summand linear in v. Within a chunk that starts from the sums (C̄_c, Ā_c),
        with b_t the cumulative log gate since the chunk's start,

            Ā_t = exp(b_t) Ā_c + Σ_{i≤t} exp(b_t − b_i) β_i k_i k_iᵀ,   C̄_t likewise with β_i v_i k_iᵀ,

        for every position of the chunk at once (masked matmuls; weights exp(b_t − b_i) ≤ 1, never the growing
        exp(−b_i)); then x_t = M(Ā_t) q_t by the layer's own precondition program per position (a Cholesky or
        conjugate-gradient solve, or the GD polynomial) and o_t = C̄_t x_t. Only C̄, Ā are carried from chunk to
        chunk, recomputed exactly from the sums (no rank-one update carried). A per-key-channel gate is not
        covered (the closed form has no Gram sums for it either); :mod:`mesagen.ir.lower` checks that."""
        if not self.uses_gram or self.gram_chunkable:
            return False
        cbar = next(a for a in self.accumulators if a.name == "Cbar")
        return _linear_in(cbar.summand, "v")


_KD = sp.Symbol("K", integer=True, positive=True)
_VD = sp.Symbol("V", integer=True, positive=True)


def _same(a: sp.Basic, b: sp.Basic) -> bool:
    """Whether two matrix expressions are structurally equal once both are canonicalised (sympy's ``doit``)."""
    return a.doit() == b.doit()


@dataclass(frozen=True)
class DeltaChunkForm:
    """The chunked (WY / UT) form of a delta-rule recurrence with one state S = Wᵀ [K, V] per head:

        S' = Diag(α_t) S_{t−1} (or α_t S_{t−1}),   S_t = S' + ε_t k_t (v_t − S'ᵀ k_t)ᵀ,   o_t = S_tᵀ q_t,

    decay first (fla), with a scalar *effective step* ε_t per token and head. Within a chunk the pseudo-values
    u_t = ε_t (v_t − S'ᵀ k_t) solve the unit lower-triangular system (I + tril(diag(ε) (K Kᵀ ⊙ Γ), −1)) U =
    diag(ε) (V − (Γ K) S₀) (Γ: the in-chunk decays), after which outputs and the next state are masked matmuls
    (Yang et al. 2024, "Parallelizing linear transformers with the delta rule over sequence length"; gated:
    Yang et al. 2025, "Gated Delta Networks"). The forget gate is the layer's :class:`Decay`.

    Attributes:
        step: a single-assignment program that assigns ``eps`` (1 × 1) from ``k`` (K × 1, after the feature map)
            and the step size's symbol: ε = β for online GD; another solver supplies its own (an implicit
            delta step: ε = β / (1 + β kᵀk)).
    """

    step: tuple[Assign, ...]

    def __post_init__(self) -> None:
        if not self.step or self.step[-1].target != "eps" or tuple(self.step[-1].shape) != (1, 1):
            raise ValueError("the step program of a DeltaChunkForm must end by assigning eps (1 × 1)")


def _linear_in(expr: sp.Basic, name: str) -> bool:
    """Whether the matrix expression ``expr`` is linear in its matrix symbol ``name`` (homogeneous of degree 1:
    doubling the symbol doubles the expression); False when the symbol does not occur."""
    sym = next((s for s in expr.free_symbols if isinstance(s, sp.MatrixSymbol) and s.name == name), None)
    if sym is None:
        return False
    diff = sp.simplify((expr.xreplace({sym: 2 * sym}) - 2 * expr).doit())
    return bool(getattr(diff, "is_ZeroMatrix", False)) or diff == 0


#: Prefix of every user-declared name in generated code. No identifier the backends write starts with it, so a
#: parameter called ``i``, ``acc`` or ``dtype`` cannot shadow a loop index or a local of the generated code.
USER_PREFIX = "u_"


@dataclass(frozen=True)
class ParamDecl:
    """A learned parameter in its constrained space: one per head ``[H]`` or one per head and key channel ``[H, K]``
    (a per-key-channel ridge coefficient; the per-head programs see it as a K × 1 column).

    Attributes:
        name: the spec's name (dictionary key of ``params`` and ``PARAMS``; gradients are ``d<name>``).
        init, domain: from the spec.
        shape: ``("H",)`` or ``("H", "K")``.
        symbol: the identifier in generated code (``USER_PREFIX + name``).
    """

    name: str
    init: float
    domain: str
    shape: tuple[str, ...] = ("H",)

    def __post_init__(self) -> None:
        if self.shape not in (("H",), ("H", "K")):
            raise ValueError(f"parameter {self.name}: shape {self.shape} is not (H,) or (H, K)")

    @property
    def channel(self) -> bool:
        """Whether the parameter has one value per key channel."""
        return len(self.shape) == 2

    @property
    def symbol(self) -> str:
        """Identifier of this parameter in generated code."""
        return USER_PREFIX + self.name


INPUT_ROLES = ("gate", "step_size", "importance")


@dataclass(frozen=True)
class InputDecl:
    """A per-token input; ``name`` is the keyword of ``forward``, ``symbol`` the code identifier.

    Attributes:
        name, space, domain: from the spec.
        shape: axis letters, ``("B", "T", "H")`` or with a trailing ``"K"`` (per key channel) / ``"V"``
            (per value channel).
        role: what the solver does with it: ``gate`` (a forget gate), ``step_size`` (online GD's β),
            ``importance`` (a loss weight β_i).
    """

    name: str
    space: str
    domain: str
    shape: tuple[str, ...] = ("B", "T", "H")
    role: str = "step_size"

    def __post_init__(self) -> None:
        if self.shape not in (("B", "T", "H"), ("B", "T", "H", "K"), ("B", "T", "H", "V")):
            raise ValueError(f"input {self.name}: bad shape {self.shape}")
        if self.role not in INPUT_ROLES:
            raise ValueError(f"input {self.name}: unknown role {self.role!r}")

    @property
    def channel(self) -> str | None:
        """``"K"`` or ``"V"`` for a per-channel input, else None."""
        return self.shape[3] if len(self.shape) == 4 else None

    @property
    def symbol(self) -> str:
        """Identifier of this input in generated code."""
        return USER_PREFIX + self.name


@dataclass(frozen=True)
class LayerIR:
    """Everything a backend needs to print one layer module.

    Attributes:
        name: spec name (module folder).
        spec_path: spec path as given on the command line, relative (for the header).
        spec_sha256: hash of the canonical spec.
        description: one paragraph from the spec.
        params / inputs: declarations, in spec order.
        recurrence: the recurrent form (states in stored orientation, scheduled).
        kernel: the parallel form, or None when the solver has none.
        forms: the forms offered, "recurrent" first; ``closed_form`` exactly when a kernel form exists, ``chunked``
            only where that kernel form is :attr:`KernelForm.chunkable`, :attr:`KernelForm.gram_chunkable` or
            :attr:`KernelForm.stats_chunkable` (with a per-head gate), or a delta-rule chunk form exists.
        out_arg: the ``--out`` folder of the header's regenerate command, relative to the folder that holds
            the spec's folder (POSIX); empty for the default ``generated``.
        decay: the forget gate of decayed weights, or None (uniform weights).
        importance: the name of the importance-weight input, or None.
        feature_map: φ applied to q and k by the frame (``identity``, ``l2_normalize``, ``elu_plus_one``).
        default_scale: the query scale when the caller passes none: a float, or ``"inverse_sqrt_dk"``.
        linear_solve: how the programs' inverses (all of symmetric positive-definite matrices: the exact
            solvers' Σ ω β k kᵀ + Λ) are computed: ``cholesky``, ``conjugate_gradient``, or None (no exact solver).
        cg: (max_iterations, tolerance) of ``conjugate_gradient``, else None.
        delta_chunk: the chunked (WY) form of a delta-rule recurrence, or None (see :class:`DeltaChunkForm`).
    """

    name: str
    spec_path: str
    spec_sha256: str
    description: str
    params: tuple[ParamDecl, ...]
    inputs: tuple[InputDecl, ...]
    recurrence: Recurrence
    kernel: KernelForm | None
    forms: tuple[str, ...] = field(default=("recurrent",))
    out_arg: str = ""
    decay: Decay | None = None
    importance: str | None = None
    feature_map: str = "identity"
    default_scale: float | str = 1.0
    linear_solve: str | None = None
    cg: tuple[int, float] | None = None
    delta_chunk: DeltaChunkForm | None = None

    def __post_init__(self) -> None:
        if not self.forms or self.forms[0] != "recurrent":
            raise ValueError("forms must start with 'recurrent'")
        if self.recurrence.backward == "implicit" and (self.kernel is None or not self.kernel.uses_gram):
            raise ValueError("backward 'implicit' needs a kernel form over the Gram sums")
        if ("closed_form" in self.forms) != (self.kernel is not None):
            raise ValueError("'closed_form' is offered exactly when a kernel form exists")
        if "chunked" in self.forms and (self.kernel is None or not (
                self.kernel.chunkable or self.kernel.gram_chunkable or self.kernel.stats_chunkable)
                ) and self.delta_chunk is None:
            raise ValueError("'chunked' needs a kernel form without Gram sums that is linear in v, the exact ridge solve "
                             "x = Ā⁻¹ q over the rank-one sums k kᵀ, v kᵀ, a kernel form over decayed statistics, or "
                             "a delta-rule chunk form")
        if ("chunked" in self.forms and self.kernel is not None and self.kernel.stats_chunkable
                and self.decay is not None and self.decay.per_channel):
            raise ValueError("the chunked form over the statistics needs one gate per head, not per key channel")
        if self.delta_chunk is not None and ("chunked" not in self.forms or self.kernel is not None or [
                (s.name, tuple(s.shape)) for s in self.recurrence.states] != [("S", ("K", "V"))]):
            raise ValueError("a delta-rule chunk form needs one state S [K, V], no kernel form, and 'chunked' offered")
        if set(self.forms) - {"recurrent", "closed_form", "chunked"}:
            raise ValueError(f"unknown forms in {self.forms}")
        if self.linear_solve not in (None, "cholesky", "conjugate_gradient"):
            raise ValueError(f"unknown linear solve {self.linear_solve!r}")
        if (self.cg is not None) != (self.linear_solve == "conjugate_gradient"):
            raise ValueError("cg settings go with linear_solve 'conjugate_gradient' exactly")
        if self.feature_map not in ("identity", "l2_normalize", "elu_plus_one"):
            raise ValueError(f"unknown feature map {self.feature_map!r}")
        if self.decay is not None and self.decay.source == "input" and self.decay.gate not in {
                i.name for i in self.inputs if i.role == "gate"}:
            raise ValueError(f"the gate {self.decay.gate!r} is not an input with role 'gate'")
        if self.recurrence.backward == "implicit" and self.decay is not None:
            raise ValueError("backward 'implicit' is derived for uniform weights only")

    @property
    def gate_input(self) -> InputDecl | None:
        """The per-token forget-gate input, or None."""
        return next((i for i in self.inputs if i.role == "gate"), None)


@dataclass(frozen=True)
class KernelLayerIR:
    """A kernel-regression layer (constant model, kernel weights: softmax / forgetting attention, docs/family.md §9).

    It has no per-head matrix program: its state is a KV cache and every form is fixed by the frame
    (mesagen.backends.templates.jax_kernel); the IR names what varies between specs.

    Attributes:
        name, spec_path, spec_sha256, description, out_arg: as in :class:`LayerIR`.
        inputs: the per-token inputs (only the forget gate, role ``gate``, or none).
        feature_map: φ applied to q and k before the kernel.
        default_scale: the kernel's temperature when the caller passes none (a float or ``"inverse_sqrt_dk"``).
        forms: the forms offered (``recurrent``: exact masked attention; ``chunked``: online softmax).
    """

    name: str
    spec_path: str
    spec_sha256: str
    description: str
    inputs: tuple[InputDecl, ...]
    feature_map: str = "identity"
    default_scale: float | str = 1.0
    forms: tuple[str, ...] = ("recurrent", "chunked")
    out_arg: str = ""

    def __post_init__(self) -> None:
        if self.forms != ("recurrent", "chunked"):
            raise ValueError(f"a kernel layer offers the forms ('recurrent', 'chunked'), got {self.forms}")
        if len(self.inputs) > 1 or any(x.role != "gate" or x.shape != ("B", "T", "H") for x in self.inputs):
            raise ValueError("a kernel layer takes at most one input, a forget gate [B, T, H]")

    @property
    def params(self) -> tuple[ParamDecl, ...]:
        """The learned parameters: none (as :attr:`LayerIR.params`, for code that lists a layer's parameters)."""
        return ()

    @property
    def gate(self) -> InputDecl | None:
        """The forget-gate input, or None (softmax attention without decay)."""
        return self.inputs[0] if self.inputs else None
