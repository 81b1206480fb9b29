"""Solvers: the training loop (solver.py), lr policies (lr_policy.py) and one class per update rule."""
from .sgd import SGDSolver
from .solver import Solver, get_solver, read_solver_param

__all__ = ["Solver", "SGDSolver", "get_solver", "read_solver_param"]
