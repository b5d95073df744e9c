"""IR records: small frozen dataclasses that check their own invariants.

The IR describes one head of a layer in matrix form. Vectors are columns (``k`` is d_k × 1), scalars are
1 × 1 matrices, and every right-hand side is a sympy matrix expression over named symbols. Backends print
these expressions; they never re-derive anything.

Shapes are written with the symbolic dims ``K`` (d_k) and ``V`` (d_v) or the integer 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy as sp

Dim = str | int  # "K", "V" or 1


def _check_dim(d: Dim, where: str) -> None:
    if d not in ("K", "V", 1):
        raise ValueError(f"{where}: dimension must be 'K', 'V' or 1, got {d!r}")


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


@dataclass(frozen=True)
class Recurrence:
    """The recurrent form: per token, ``update`` writes every ``<state>_new``; ``readout`` writes ``o``.

    The readout reads the *new* states (o_t is answered after token t is absorbed).
    """

    states: tuple[StateDecl, ...]
    update: tuple[Assign, ...]
    readout: tuple[Assign, ...]
    backward: str = "autodiff"
    """How reverse mode is generated:

    - ``autodiff``: plain autodiff through the scan.
    - ``checkpointed``: autodiff through ⌈√T⌉ rematerialised segments (activation memory O(√T)).
    - ``implicit``: the exact ridge solution o_t = C_t A_t⁻¹ q_t differentiated implicitly (one more product
      with the stored inverse per token, no adjoint through the rank-one recursion), with the recurrence
      refactorised from its exact statistics at every segment boundary. Requires a kernel form and the states
      ``(W, P)`` = (C_t A_t⁻¹, A_t⁻¹), in this order.
    """

    def __post_init__(self) -> None:
        written = [a.target for a in self.update + self.readout]
        if len(written) != len(set(written)):
            dup = sorted({n for n in written if written.count(n) > 1})
            raise ValueError(f"single assignment violated for {dup}")
        for st in self.states:
            if f"{st.name}_new" not in written:
                raise ValueError(f"state {st.name!r} has no update {st.name}_new")
        if "o" not in [a.target for a in self.readout]:
            raise ValueError("readout must assign 'o'")
        if self.backward not in ("autodiff", "checkpointed", "implicit"):
            raise ValueError(f"unknown backward {self.backward!r}")
        if self.backward == "implicit" and [(s.name, s.shape) for s in self.states] not in (
                [("W", ("V", "K")), ("P", ("K", "K"))], [("S", ("K", "V")), ("P", ("K", "K"))]):
            raise ValueError("backward 'implicit' needs the states (W [V, K], P [K, K]) = (C A⁻¹, A⁻¹)")


@dataclass(frozen=True)
class KernelForm:
    """The parallel (closed) form shared by every layer whose answer is o_t = C̄_t x_t:

        C̄_t = C̄₀ + Σ_{i≤t} v_i k_iᵀ,   Ā_t = Ā₀ + Σ_{i≤t} k_i k_iᵀ,   x_t = M(Ā_t) q_t,
        o_t = C̄₀ x_t + Σ_{i≤t} v_i (k_iᵀ x_t)                       (quadratic in T).

    Linear attention (M = ηI), k-step GD (M a polynomial) and the mesa layer (M = Ā⁻¹) are all of this
    form (von Oswald et al. 2023, Sec. 3: the mesa layer is attention with preconditioned queries).

    Attributes:
        uses_gram: whether x depends on Ā (else the Gram sums are skipped).
        stats_from_state: assigns ``C0`` (V×K) and, if uses_gram, ``A0`` (K×K) from the old states.
        precondition: assigns ``x`` (K×1) from ``q``, ``Abar`` (= Ā_t) and parameters.
        state_from_stats: assigns every ``<state>_new`` from ``Cbar`` (= C̄_T) and ``Abar`` (= Ā_T).
    """

    uses_gram: bool
    stats_from_state: tuple[Assign, ...]
    precondition: tuple[Assign, ...]
    state_from_stats: tuple[Assign, ...]

    def __post_init__(self) -> None:
        if "x" not in [a.target for a in self.precondition]:
            raise ValueError("precondition must assign 'x'")


#: Prefix of every user-declared name in generated code. No identifier the backends write starts with it, so a
#: parameter called ``i``, ``acc`` or ``dtype`` cannot shadow a loop index or a local of the generated code.
USER_PREFIX = "u_"


@dataclass(frozen=True)
class ParamDecl:
    """A per-head parameter ``[H]`` in its constrained space.

    Attributes:
        name: the spec's name (dictionary key of ``params`` and ``PARAMS``; gradients are ``d<name>``).
        init, domain: from the spec.
        symbol: the identifier in generated code (``USER_PREFIX + name``).
    """

    name: str
    init: float
    domain: str

    @property
    def symbol(self) -> str:
        """Identifier of this parameter in generated code."""
        return USER_PREFIX + self.name


@dataclass(frozen=True)
class InputDecl:
    """A per-token input ``[B, T, H]``; ``name`` is the keyword of ``forward``, ``symbol`` the code identifier."""

    name: str
    space: str
    domain: str

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
        forms: the forms offered, "recurrent" first.
        out_arg: the ``--out`` folder of the header's regenerate command, relative to the folder that holds
            the spec's folder (POSIX); empty for the default ``generated``.
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

    def __post_init__(self) -> None:
        if not self.forms or self.forms[0] != "recurrent":
            raise ValueError("forms must start with 'recurrent'")
        if self.recurrence.backward == "implicit" and (self.kernel is None or not self.kernel.uses_gram):
            raise ValueError("backward 'implicit' needs a kernel form over the Gram sums")
        if ("closed_form" in self.forms) != (self.kernel is not None):
            raise ValueError("'closed_form' is offered exactly when a kernel form exists")
