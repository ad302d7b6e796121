"""A block-diagonal curvature: one solver per block of parameters.

With ``block_structure="layer"`` (or groups of parameter names) the curvature ``A``
is approximated by its diagonal blocks ``A_bb``, one per layer (or group), and
the cross-block curvature is dropped. Each block is its own problem: the Hessian
(or Gauss-Newton matrix) of the mean training loss with respect to that block's
parameters alone, the others held at their values, plus the block of the
estimator's penalty and the same regularization lambda. A sub-solver of the chosen
method is fitted on each, through a model adapter restricted to the block's
parameters, so that its products (and the Direct method's dense matrix) cost only
the block's share; then ``A^-1 G`` is the concatenation of ``A_bb^-1 G_b``.

Memory of the Direct method drops from ``p^2`` to the sum of the blocks' squares;
the iterative methods solve smaller, usually better conditioned systems.
"""

from __future__ import annotations

import dataclasses

import torch

from .._adapters import ModelAdapter
from .._modules import parameter_owners
from ._base import CurvatureOperator, Solver, SolveReport

__all__ = ["BlockDiagonalSolver", "resolve_blocks"]

#: The operations a wrapped solver must leave at their defaults: the blocks are
#: solved in the parameters' own coordinates.
_DEFAULT_OPERATIONS = ("factors", "parameter_factors", "pairwise", "self_scores")


def resolve_blocks(adapter: ModelAdapter, block_structure) -> dict:
    """The blocks of parameters a ``block_structure`` asks for: name -> names.

    Parameters
    ----------
    adapter : ModelAdapter
        The model, with the parameters taken into account.
    block_structure : {"full", "layer"} or list of lists of str
        "full": one block of every parameter. "layer": one block per module holding
        parameters (the layers of ``influences_by_layer``), named by the module.
        A list: one block per group of parameter names or module prefixes (a string
        alone is a group of one), named by its entries joined with "+"; every
        parameter must be in exactly one group.

    Returns
    -------
    blocks : dict of str to list of str
        Block name -> its parameter names, in the model's order.

    Raises
    ------
    ValueError
        Naming ``block_structure``: an entry that matches no parameter taken into
        account, a parameter in two groups, parameters in no group, an empty group.

    Examples
    --------
    >>> import torch
    >>> from skinfluence._adapters import build_adapter
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    >>> a = build_adapter(net, loss=torch.nn.functional.mse_loss)
    >>> resolve_blocks(a, "layer")
    {'0': ['0.weight', '0.bias'], '2': ['2.weight', '2.bias']}
    >>> resolve_blocks(a, [["0.weight"], ["0.bias", "2"]])
    {'0.weight': ['0.weight'], '0.bias+2': ['0.bias', '2.weight', '2.bias']}
    """
    names = list(adapter.param_names)
    if isinstance(block_structure, str):
        if block_structure == "full":
            return {"full": names}
        if block_structure == "layer":
            owners = parameter_owners(adapter.module)
            out = {}
            for n in names:
                out.setdefault(owners[n][0], []).append(n)
            return out
        raise ValueError(
            f'block_structure: got {block_structure!r}; use "full", "layer" or a list '
            "of groups of parameter names."
        )
    if not isinstance(block_structure, list | tuple) or not block_structure:
        raise ValueError(
            f"block_structure: got {block_structure!r}; pass a non-empty list of groups, "
            'each a list of parameter names or module prefixes, or "full" / "layer".'
        )
    every = [n for n, _ in adapter.module.named_parameters()]
    owner, out = {}, {}
    for i, group in enumerate(block_structure):
        entries = [group] if isinstance(group, str) else group
        if not isinstance(entries, list | tuple) or not entries or not all(
            isinstance(e, str) for e in entries
        ):
            raise ValueError(
                f"block_structure: group {i} is {group!r}; each group is a non-empty "
                "list of parameter names or module prefixes (strings)."
            )
        members = []
        for want in entries:
            hits = [n for n in names if n == want or n.startswith(want + ".")]
            if not hits:
                model = [n for n in every if n == want or n.startswith(want + ".")]
                why = (
                    f"{want!r} names parameters not taken into account ({model}; see "
                    "params)" if model else f"{want!r} matches no parameter of the model"
                )
                raise ValueError(
                    f"block_structure: in group {i}, {why}. Parameters taken into "
                    f"account: {names}."
                )
            for n in hits:
                if n in owner and owner[n] != i:
                    raise ValueError(
                        f"block_structure: parameter {n!r} is in group {owner[n]} and in "
                        f"group {i}; every parameter must be in exactly one group."
                    )
                owner[n] = i
                if n not in members:
                    members.append(n)
        out["+".join(entries)] = [n for n in names if n in members]
    missing = [n for n in names if n not in owner]
    if missing:
        raise ValueError(
            f"block_structure: the groups leave out the parameters {missing}; every "
            "parameter taken into account must be in exactly one group (add them to a "
            'group, or use block_structure="layer").'
        )
    return out


class BlockDiagonalSolver(Solver):
    """One solver per diagonal block of the curvature (see the module docstring).

    Parameters
    ----------
    solver : Solver
        An unfitted solver of the method; each block gets a copy with its settings
        (:meth:`Solver.restricted`: a rank is clipped to the block's size). Its
        factors must be in the parameters' coordinates (every method but EK-FAC,
        which is block diagonal already).
    block_structure : {"layer"} or list of lists of str
        The blocks, as :func:`resolve_blocks` reads them.

    Attributes
    ----------
    blocks_ : dict of str to list of str
        Block name -> its parameter names.
    columns_ : list of torch.Tensor
        The columns of the flat parameter layout of each block.
    solvers_ : list of Solver
        The fitted solver of each block, on the block's own parameters.

    Examples
    --------
    >>> import torch
    >>> from skinfluence._adapters import build_adapter
    >>> from skinfluence.solvers import BlockDiagonalSolver, CurvatureOperator, DirectSolver
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    >>> a = build_adapter(net, loss=torch.nn.functional.cross_entropy)
    >>> X, y = torch.randn(20, 3, dtype=torch.float64), torch.arange(20) % 2
    >>> a.bind(X, 20)
    >>> op = CurvatureOperator(a, X, y, "gauss-newton", regularization=0.1, batch_size=8)
    >>> solver = BlockDiagonalSolver(DirectSolver(), "layer").fit(op)
    >>> [tuple(s.cholesky_.shape) for s in solver.solvers_]
    [(16, 16), (10, 10)]
    >>> G = torch.randn(2, op.n_params, dtype=torch.float64)
    >>> A = op.mv(torch.eye(26, dtype=torch.float64))
    >>> A[:16, 16:] = A[16:, :16] = 0  # the block-diagonal curvature
    >>> torch.allclose(solver.solve(G), torch.linalg.solve(A, G.T).T)
    True
    """

    def __init__(self, solver: Solver, block_structure="layer"):
        self.solver = solver
        self.block_structure = block_structure

    @property
    def curvature(self):
        return self.solver.curvature

    @property
    def block_solves(self) -> bool:
        return self.solver.block_solves

    def select_parameters(self, module, param_names: list[str]) -> list[str]:
        return self.solver.select_parameters(module, param_names)

    def restricted(self, n_params: int) -> Solver:  # pragma: no cover - not nested
        raise TypeError("block-diagonal solvers do not nest.")

    def fitted_attribute(self, name: str) -> list:
        return [s.fitted_attribute(name) for s in self.solvers_]

    def fit(self, operator: CurvatureOperator, progress=None, mode: str = "up") -> BlockDiagonalSolver:
        kind = type(self.solver)
        custom = [op for op in _DEFAULT_OPERATIONS if getattr(kind, op) is not getattr(Solver, op)]
        if custom:
            raise ValueError(
                f"block_structure: {kind.__name__} has its own {', '.join(custom)} (its "
                "factors are not in the parameters' coordinates), so it cannot be split "
                'into blocks; use block_structure="full".'
            )
        a = operator.adapter
        self.blocks_ = resolve_blocks(a, self.block_structure)
        self.adapter_ = a
        self.n_params_ = operator.n_params
        self.regularization_ = float(operator.regularization)
        self.columns_, self.solvers_ = [], []
        for name, names in self.blocks_.items():
            sub = a.restrict(names)
            solver = self.solver.restricted(sub.n_params)
            try:
                solver.fit(dataclasses.replace(operator, adapter=sub), progress=progress, mode=mode)
            except Exception as exc:
                exc.add_note(f"(in block {name!r} of block_structure, {sub.n_params} parameters)")
                raise
            self.columns_.append(a.columns(names))
            self.solvers_.append(solver)
        return self

    def solve(self, G: torch.Tensor, report: SolveReport | None = None) -> torch.Tensor:
        parts, figures = [], []
        for name, solver, cols in zip(self.blocks_, self.solvers_, self.columns_, strict=True):
            # this call's figures of the block, kept apart to combine them below
            one = None if report is None else SolveReport(progress=report.progress, _parent=report)
            parts.append(solver.solve(G[:, cols], one))
            if one is not None and not one.empty:
                report.part(name).add(one.n_iter, one.residuals, one.converged, one.n_products)
                figures.append(one)
        out = torch.empty(G.shape, dtype=parts[0].dtype, device=parts[0].device)
        for cols, X in zip(self.columns_, parts, strict=True):
            out[:, cols] = X
        if figures:
            # a right-hand side's residual is that of its worst block: an upper bound
            # on the relative residual of the whole block-diagonal system
            report.add(
                max(r.n_iter for r in figures),
                torch.stack([torch.as_tensor(r.residuals) for r in figures]).max(0).values.numpy(),
                torch.stack([torch.as_tensor(r.converged) for r in figures]).all(0).numpy(),
                sum(r.n_products for r in figures),
            )
        return out

    def convergence_warning(self, report: SolveReport) -> str | None:
        messages = []
        for name, solver in zip(self.blocks_, self.solvers_, strict=True):
            part = report.parts.get(name)
            if part is not None and not part.empty:
                message = solver.convergence_warning(part)
                if message:
                    messages.append(f"In block {name!r} of block_structure: {message}")
        report.close()
        return " ".join(messages) or None
