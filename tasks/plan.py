"""task=plan: the memory plan per rank and term, without loading anything or touching a GPU."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig

from longctx.preflight import memory


def task_plan(cfg: DictConfig, run_dir: Path) -> None:
    """Print the memory plan per rank and term; nothing is loaded and no GPU is touched."""
    plan, verdict = memory.plan_config(cfg), None
    if cfg.memory.limit_gib is not None:  # the verdict the run would get on ranks of that size (and its chunk)
        try:
            plan = memory.check_fits(cfg, torch.device("cpu"))
            verdict = f"fits: {plan.need / 2**30:.1f} of memory.limit_gib={cfg.memory.limit_gib} GiB per rank"
        except memory.DoesNotFit as e:
            verdict = f"does not fit: {e}"
    print(plan.table(), flush=True)
    if verdict:
        print(verdict)
    result = {"peak_bytes": plan.peak, "need_bytes": plan.need, "ranks": [r.terms for r in plan.ranks]}
    (run_dir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
