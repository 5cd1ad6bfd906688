"""The `tool-calculator` environment: arithmetic questions answered with the help of a `calculator` tool.

Reward 1.0 when the final answer contains the correct number (within a tolerance), else 0.0. It exercises tool
calls end to end: through the teacher endpoint, the tool loop, and the student's chat template when rendering.
"""

from __future__ import annotations

import random
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from apprentice.envs.base import EnvError, Task
from apprentice.envs.calculator import CALCULATOR_TOOL, CalculatorError, evaluate, format_number
from apprentice.envs.rewards import contains_number
from apprentice.envs.single_turn import ScoreFn
from apprentice.envs.tool_env import Tool, ToolEnv, ToolError

DEFAULT_SYSTEM_PROMPT = (
    "You can use a calculator tool. Call it to compute the value of the expression, then reply with the final number."
)
_OPS = ["+", "-", "*", "/"]


class ToolCalculatorArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_tasks: int = Field(default=1000, ge=1, le=1_000_000)
    """Training tasks."""
    num_eval_tasks: int = Field(default=64, ge=0, le=100_000)
    """Held-out tasks (expressions never seen in training)."""
    min_ops: int = Field(default=1, ge=1, le=10)
    """Fewest operators in an expression."""
    max_ops: int = Field(default=3, ge=1, le=10)
    """Most operators in an expression."""
    max_operand: int = Field(default=99, ge=2, le=1_000_000)
    """Operands are integers in [1, max_operand]."""
    max_turns: int = Field(default=4, ge=1, le=64)
    """Model turns per episode (tool-calling turns plus the answer)."""
    tolerance: float = Field(default=1e-6, ge=0.0)
    """Relative and absolute tolerance of the answer check."""
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    """The instruction sent as the system message."""
    name: str = Field(default="tool-calculator", min_length=1)
    """Name in metrics."""
    seed: int | None = None
    """Seed of the generated expressions; defaults to the run's seed."""

    @model_validator(mode="after")
    def _ops(self) -> ToolCalculatorArgs:
        if self.min_ops > self.max_ops:
            raise ValueError(f"min_ops ({self.min_ops}) must be <= max_ops ({self.max_ops})")
        return self


def random_expression(rng: random.Random, args: ToolCalculatorArgs) -> tuple[str, int]:
    """An expression with an integer value (division only where it is exact), optionally one parenthesised span."""
    while True:
        n_ops = rng.randint(args.min_ops, args.max_ops)
        operands = [str(rng.randint(1, args.max_operand)) for _ in range(n_ops + 1)]
        if n_ops >= 2 and rng.random() < 0.5:
            start = rng.randrange(n_ops)
            end = rng.randint(start + 1, n_ops)
            operands[start], operands[end] = "(" + operands[start], operands[end] + ")"
        parts = [operands[0]]
        for operand in operands[1:]:
            parts += [rng.choice(_OPS), operand]
        expression = " ".join(parts)
        try:
            value = evaluate(expression)
        except CalculatorError:  # division by zero inside parentheses, out of range: draw again
            continue
        if float(value).is_integer():
            return expression, int(value)


def calculator_fn(args: dict[str, Any]) -> str:
    expression = args.get("expression")
    if not isinstance(expression, str):
        raise ToolError(f"calculator needs a string argument 'expression', got arguments {args}")
    return format_number(evaluate(expression))


def score_calculator(tolerance: float) -> ScoreFn:
    def score(text: str, task: Task) -> tuple[float, dict[str, float]]:
        return float(contains_number(text, task.answer, rel_tol=tolerance, abs_tol=tolerance)), {}

    return score


def make_tool_calculator_env(args: ToolCalculatorArgs, seed: int) -> ToolEnv:
    rng = random.Random(args.seed if args.seed is not None else seed)
    seen: set[str] = set()
    splits: dict[str, list[Task]] = {}
    for split, n in (("train", args.num_tasks), ("eval", args.num_eval_tasks)):
        tasks: list[Task] = []
        for _ in range(100 * n + 1000):  # bounded: small operand ranges have few distinct expressions
            if len(tasks) == n:
                break
            expression, value = random_expression(rng, args)
            if expression in seen:
                continue
            seen.add(expression)
            prompt = [
                {"role": "system", "content": args.system_prompt},
                {"role": "user", "content": f"What is {expression}?"},
            ]
            tasks.append(Task(id=f"{split}-{len(tasks)}", prompt=prompt, answer=value, info={"expression": expression}))
        if len(tasks) < n:
            raise EnvError(
                f"tool-calculator: could only draw {len(tasks)} distinct {split} expressions of {n}; "
                "raise max_operand/max_ops or lower num_tasks/num_eval_tasks"
            )
        splits[split] = tasks
    calculator = Tool(schema=CALCULATOR_TOOL, fn=calculator_fn)
    return ToolEnv(
        args.name, splits["train"], splits["eval"], [calculator], score_calculator(args.tolerance), args.max_turns
    )
