"""A safe arithmetic evaluator and its OpenAI tool schema (the `calculator` tool of `tool-calculator`).

Expressions are parsed with `ast` and only numbers, + - * / **, parentheses and unary +/- are evaluated; model
output is never passed to eval(). Sizes are bounded so a hostile expression (9**9**9) cannot stall the process.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable

MAX_EXPRESSION_CHARS = 200
MAX_EXPONENT = 64
MAX_MAGNITUDE = 1e15

CALCULATOR_TOOL: dict = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression with + - * / ** and parentheses, e.g. '12 * (3 + 4)'.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "The arithmetic expression."}},
            "required": ["expression"],
        },
    },
}


class CalculatorError(ValueError):
    """An expression the calculator refuses or cannot compute; the message is shown to the model."""


def _pow(base: float, exp: float) -> float:
    if abs(exp) > MAX_EXPONENT:
        raise CalculatorError(f"exponent {exp} is too large (at most {MAX_EXPONENT})")
    if base == 0 and exp < 0:
        raise CalculatorError("division by zero (0 to a negative power)")
    try:
        return operator.pow(base, exp)
    except OverflowError as e:
        raise CalculatorError("result is out of range") from e


def _div(a: float, b: float) -> float:
    if b == 0:
        raise CalculatorError("division by zero")
    return a / b


_BINARY: dict[type[ast.operator], Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: _div,
    ast.Pow: _pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[float], float]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def _eval(node: ast.AST) -> float:
    value: float | complex
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        value = node.value
    elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        value = _BINARY[type(node.op)](_eval(node.left), _eval(node.right))
    elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        value = _UNARY[type(node.op)](_eval(node.operand))
    else:
        raise CalculatorError(f"unsupported syntax {ast.unparse(node)!r}: use numbers, + - * / ** and parentheses")
    if isinstance(value, complex):  # (-8) ** 0.5
        raise CalculatorError(f"{ast.unparse(node)!r} has no real value")
    if not math.isfinite(value) or abs(value) > MAX_MAGNITUDE:
        raise CalculatorError(f"result of {ast.unparse(node)!r} is out of range")
    return value


def evaluate(expression: str) -> float:
    """The value of an arithmetic expression, or CalculatorError saying what is wrong with it."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"expression is longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip().replace("^", "**"), mode="eval")
    except SyntaxError as e:
        raise CalculatorError(f"cannot parse {expression!r}: {e.msg}") from e
    return _eval(tree.body)


def format_number(value: float) -> str:
    """Integers without a decimal point ("518"), other values with up to 12 significant digits."""
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.12g}"
