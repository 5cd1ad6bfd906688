"""rl mode: held-out evaluation during the run, through the same inference server the rollouts use.

Every `orchestrator.eval_interval` steps (before sampling that step, so on the weights that sample it) and
once more on the final weights, every environment's eval tasks are rolled out (greedy by default) and the
mean rewards go to OUTPUT/orchestrator/eval.jsonl as one line per evaluated policy:
    {"step": n, "policy/step": w, "eval/reward": ..., "eval/{env}/reward": ..., "eval/{env}/failed": ...}
`step` is the orchestrator step the evaluation ran before (max_steps + 1 for the final one).
"""

from __future__ import annotations

from apprentice.config import Config
from apprentice.eval import evaluate_endpoint
from apprentice.orchestrator.client import rollout_endpoint


def due(cfg: Config, step: int) -> bool:
    """Evaluate before sampling step `step`? (steps 1, 1 + interval, ...)."""
    interval = cfg.orchestrator.eval_interval
    return interval > 0 and (step - 1) % interval == 0


async def eval_policy(cfg: Config) -> dict[str, float]:
    """`eval/*` metrics of the policy the server holds now."""
    results = await evaluate_endpoint(cfg, rollout_endpoint(cfg))  # at eval_temperature, over eval_num_tasks
    metrics: dict[str, float] = {}
    for r in results:
        metrics[f"eval/{r.env}/reward"] = r.reward
        metrics[f"eval/{r.env}/failed"] = float(r.failed)
    total_tasks = sum(r.tasks for r in results)
    metrics["eval/reward"] = sum(r.reward * r.tasks for r in results) / max(1, total_tasks)
    return metrics
