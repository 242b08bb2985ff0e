"""What a run does once its ranks and model exist (generate, ruler, bench), and task=plan, which needs neither.

Each task is a module: its options' schema, its own checks before anything starts, and what it runs.
"""

from longctx.preflight.options import TaskSpec
from longctx.tasks import bench, generate, ruler
from longctx.tasks.bench import BENCH_SETUP_STEPS
from longctx.tasks.context import Context
from longctx.tasks.generate import demo_prompt
from longctx.tasks.plan import task_plan

TASKS = {
    "generate": TaskSpec(generate.task_generate, generate.GenerateOptions, generate.check, needs_weights=True),
    "ruler": TaskSpec(ruler.task_ruler, ruler.RulerOptions, ruler.check, needs_weights=True),
    "bench": TaskSpec(bench.task_bench, bench.BenchOptions, bench.check),
    "plan": TaskSpec(task_plan, bench.PlanOptions, bench.check, needs_model=False),
}

__all__ = ["BENCH_SETUP_STEPS", "TASKS", "Context", "demo_prompt"]
