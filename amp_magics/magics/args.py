"""Flag parsing shared by every magic: IPython's magic_arguments, made strict and friendly."""
from __future__ import annotations

import ast
import operator
from typing import TYPE_CHECKING, Any

from IPython.core.error import UsageError
from IPython.core.magic_arguments import parse_argstring

if TYPE_CHECKING:
    import argparse

_OPERATORS = {ast.Pow: operator.pow, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.Add: operator.add, ast.Sub: operator.sub}


def parse(magic: Any, line: str) -> argparse.Namespace:
    """Parse `line` for `magic`; every problem is a UsageError that ends with the usage."""
    usage = magic.parser.format_usage()
    try:
        args = parse_argstring(magic, line)
    except UsageError as e:
        raise UsageError(f"{e}\n{usage}") from None
    except ValueError as e:  # the splitter's own errors, e.g. an unclosed quote
        raise UsageError(f"cannot split the flags ({e}): close every quote\n{usage}") from None
    # IPython splits flags without removing quotes: --sweep "lr=1e-3; clip=1" keeps them.
    for key, value in vars(args).items():
        setattr(args, key, [_unquote(v) for v in value] if isinstance(value, list)
                else _unquote(value))
    return args


def _unquote(value):
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def number(text: str) -> float:
    """A number written as a literal or simple arithmetic: 65536, 2**14, 2.**16, 1e4."""
    def evaluate(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return float(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            left, right = evaluate(node.left), evaluate(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 1024:
                raise ValueError("exponent too large")
            return _OPERATORS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -evaluate(node.operand)
        raise ValueError(f"not a number: {text!r}")

    try:
        return evaluate(ast.parse(text.strip(), mode="eval").body)
    except (SyntaxError, ValueError, OverflowError, ZeroDivisionError) as e:
        raise ValueError(str(e)) from None


def names(text: str) -> list[str]:
    """'a, b,c' -> ['a', 'b', 'c']"""
    return [n.strip() for n in text.split(",") if n.strip()]
