"""Dataflow graph of a per-token program: checks and deterministic scheduling (networkx).

Nodes are names (inputs, old states, temporaries, ``<state>_new``, ``o``); an edge ``a → b`` means the
assignment of ``b`` reads ``a``. Graphs are built on demand from the frozen records, never stored.
"""

from __future__ import annotations

import networkx as nx

from mesagen.ir.records import Assign


def dataflow(assigns: tuple[Assign, ...], available: set[str]) -> nx.DiGraph:
    """Build the read/write graph of ``assigns``.

    Args:
        assigns: the program.
        available: names defined before the program runs (inputs, old states, parameters).

    Returns:
        A DiGraph whose nodes carry ``order`` (the assignment's index, or -1 for available names).

    Raises:
        ValueError: a name is assigned twice, shadows an available name, or is read before any definition.
    """
    g = nx.DiGraph()
    for name in sorted(available):
        g.add_node(name, order=-1)
    for i, a in enumerate(assigns):
        if a.target in g:
            raise ValueError(f"single assignment violated: {a.target!r} is written twice or shadows an input")
        g.add_node(a.target, order=i)
    for a in assigns:
        for r in a.reads:
            if r not in g:
                raise ValueError(f"{a.target!r} reads {r!r}, which is never defined")
            g.add_edge(r, a.target)
    if not nx.is_directed_acyclic_graph(g):
        raise ValueError(f"cyclic dependencies: {nx.find_cycle(g)}")
    return g


def schedule(assigns: tuple[Assign, ...], available: set[str]) -> tuple[Assign, ...]:
    """Deterministic topological order (ties broken by original position), after checking the graph.

    Raises:
        ValueError: as :func:`dataflow` (double assignment, undefined read, cycle).
    """
    g = dataflow(assigns, available)
    by_name = {a.target: a for a in assigns}
    order = nx.lexicographical_topological_sort(g, key=lambda n: (g.nodes[n]["order"], n))
    return tuple(by_name[n] for n in order if n in by_name)


def live(assigns: tuple[Assign, ...], available: set[str], outputs: set[str]) -> set[str]:
    """Names (assigned or available) from which some name in ``outputs`` can be reached.

    Raises:
        ValueError: as :func:`dataflow`.
    """
    g = dataflow(assigns, available)
    keep = set(outputs)
    for out in outputs:
        if out in g:
            keep |= nx.ancestors(g, out)
    return keep
