"""Symbolic operands that turn a Python formula into an OpenCL C float expression.

A formula such as `lambda x, p, ops: ops.maximum(x, 0) + p.negative_slope * ops.minimum(x, 0)` runs on numpy
arrays with numpy's ops, and here on `Expr`s with SYMBOLIC_OPS, which build the C text
`(fmax(v_x, 0.0f) + (p_negative_slope * fmin(v_x, 0.0f)))`. Every value is a C float: comparisons give 1.0f or
0.0f, as numpy's booleans count as 1 and 0 in arithmetic.
"""
import math
from types import SimpleNamespace

import numpy as np

from .errors import KaffeError


def literal(value):
    """A C float literal that reads back as the same float32 (`0.5f`, `1.0f`, `1e-10f`, `INFINITY`)."""
    value = np.float32(value)
    if math.isnan(value):
        return "NAN"
    if math.isinf(value):
        return "INFINITY" if value > 0 else "(-INFINITY)"
    text = format(value, ".9g")  # 9 significant digits round-trip every float32
    if not any(c in text for c in ".en"):
        text += ".0"
    return f"{text}f" if not text.startswith("-") else f"({text}f)"


def as_expr(value):
    if isinstance(value, Expr):
        return value
    if isinstance(value, (bool, int, float, np.number)):
        return Expr(literal(value))
    raise KaffeError(f"a formula can only combine its operands with numbers, got {type(value).__name__}")


def _binary(op):
    return lambda a, b: Expr(f"({as_expr(a).code} {op} {as_expr(b).code})")


def _compare(op):
    return lambda a, b: Expr(f"(float)({as_expr(a).code} {op} {as_expr(b).code})")


def _truth(e):
    return f"({as_expr(e).code} != 0.0f)"


class Expr:
    """A float-valued OpenCL C expression, combined with Python operators into bigger ones."""
    __slots__ = ("code",)
    # numpy scalars on the left hand the operation to Expr's reflected operators instead of wrapping it
    __array_ufunc__ = None

    def __init__(self, code):
        self.code = code

    __add__ = _binary("+")
    __sub__ = _binary("-")
    __mul__ = _binary("*")
    __truediv__ = _binary("/")
    __radd__ = lambda self, other: _binary("+")(other, self)
    __rsub__ = lambda self, other: _binary("-")(other, self)
    __rmul__ = lambda self, other: _binary("*")(other, self)
    __rtruediv__ = lambda self, other: _binary("/")(other, self)
    __pow__ = lambda self, other: _function("pow")(self, other)
    __rpow__ = lambda self, other: _function("pow")(other, self)
    __gt__ = _compare(">")
    __ge__ = _compare(">=")
    __lt__ = _compare("<")
    __le__ = _compare("<=")
    __eq__ = _compare("==")
    __ne__ = _compare("!=")
    # & | ~ are numpy's logical operators on boolean masks
    __and__ = __rand__ = lambda self, other: Expr(f"(float)({_truth(self)} && {_truth(other)})")
    __or__ = __ror__ = lambda self, other: Expr(f"(float)({_truth(self)} || {_truth(other)})")
    __invert__ = lambda self: Expr(f"(float)({self.code} == 0.0f)")
    __neg__ = lambda self: Expr(f"(-{self.code})")
    __pos__ = lambda self: self
    __abs__ = lambda self: _function("fabs")(self)
    __hash__ = None

    def __bool__(self):
        raise KaffeError("a formula cannot branch on its operands with a Python `if`/`and`/`or`: "
                         "use ops.where(condition, a, b), & and |")

    def __repr__(self):
        return f"Expr({self.code!r})"


def _function(c_name):
    return lambda *args: Expr(f"{c_name}({', '.join(as_expr(a).code for a in args)})")


def _where(condition, if_true, if_false):
    return Expr(f"({_truth(condition)} ? {as_expr(if_true).code} : {as_expr(if_false).code})")


# the functions formulas may call, under numpy's names, as OpenCL C built-ins
SYMBOLIC_OPS = SimpleNamespace(where=_where, exp=_function("exp"), log=_function("log"),
                               log1p=_function("log1p"), tanh=_function("tanh"), abs=_function("fabs"),
                               maximum=_function("fmax"), minimum=_function("fmin"), sqrt=_function("sqrt"),
                               pow=_function("pow"))


class _SymbolicParams:
    """p.<name> -> the float kernel argument p_<name>; names not declared are an error, not a silent zero."""

    def __init__(self, formula_name, names):
        self._formula_name = formula_name
        self._names = tuple(names)

    def __getattr__(self, name):
        if name.startswith("_"):  # Python's own probes (copy, pickle) expect AttributeError
            raise AttributeError(name)
        if name not in self._names:
            raise KaffeError(f"formula {self._formula_name} reads parameter {name!r}, "
                             f"which is not among its declared parameters {self._names}")
        return Expr(f"p_{name}")


def symbolic_params(formula_name, names):
    return _SymbolicParams(formula_name, names)
