"""What a run does once its ranks and model exist (generate, ruler, bench), and task=plan, which needs neither."""

from longctx.tasks.bench import BENCH_SETUP_STEPS, task_bench
from longctx.tasks.context import Context
from longctx.tasks.generate import demo_prompt, task_generate
from longctx.tasks.plan import task_plan
from longctx.tasks.ruler import task_ruler

TASKS = {"generate": task_generate, "ruler": task_ruler, "bench": task_bench}

__all__ = ["BENCH_SETUP_STEPS", "TASKS", "Context", "demo_prompt", "task_plan"]
