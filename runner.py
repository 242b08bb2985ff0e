"""The command line: `python runner.py model=llama3 attention=star ctx=1m [task=...] [parallel.nproc=N]`.

A Hydra app over conf/. With no arguments it runs the built-in default on CPU: SmolLM2-135M-Instruct (made by
`tools/convert.py smollm2` on first use) with star attention answering a question about a pass key hidden in a
long document, then prints the time to first token, decode speed and the KV bytes each rank holds.

Each run's directory (outputs/DATE/TIME, or multirun/... for -m) holds the resolved config (.hydra/) and
results.json; W&B logs go to an offline run by default.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import signal
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from longctx.parallel.launch import Interrupted, RankFailed, init_ranks, launch, under_torchrun
from longctx.parallel.layout import make_layout
from longctx.preflight import memory, options
from longctx.tasks import TASKS, Context

# --- configuration


CONF = Path(__file__).resolve().parent / "conf"


def precheck(argv: list[str], conf: Path = CONF) -> None:
    """What Hydra would refuse with a page of its own, refused in one line before it starts: an override that does
    not parse, a config group's choice without a yaml (`decode=sparse`), a key the config does not have."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    overrides = []
    for arg in (a for a in argv if not a.startswith("-")):  # (-m, --multirun, --cfg job ...)
        try:
            (parsed,) = OverridesParser.create().parse_overrides([arg])
        except HydraException as e:
            raise options.OptionError(f"{arg}: {' '.join(str(e).split('See https')[0].split())}") from None
        key = parsed.key_or_group
        if key.startswith("hydra"):
            continue
        values = list(parsed.sweep_iterator()) if parsed.is_sweep_override() else [parsed.value()]
        if (conf / key).is_dir() and not parsed.is_delete():
            choices = sorted(p.stem for p in (conf / key).glob("*.yaml"))
            for choice in values:
                if choice not in choices:
                    raise options.OptionError(
                        f"{key}={choice} is not a choice of {key}; choices: {', '.join(choices)} (conf/{key}/)"
                    )
        overrides.append(arg if not parsed.is_sweep_override() else f"{parsed.get_key_element()}={values[0]}")
    with initialize_config_dir(str(conf), version_base="1.3"):
        try:
            compose("config", overrides=overrides)
        except HydraException as e:
            message = " ".join(str(e).split())
            key = next((k for k in (o.split("=")[0].lstrip("+~") for o in overrides) if f"'{k}'" in message), None)
            if key is None:
                raise options.OptionError(message) from None
            groups = [o for o in overrides if (conf / o.split("=")[0]).is_dir()]
            near = difflib.get_close_matches(key, _keys(compose("config", overrides=groups)), n=1)
            raise options.OptionError(
                f"{key} is not in the config{f'; did you mean {near[0]}?' if near else ''} ({message})"
            ) from None


def _keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Every dotted key of a config."""
    out = []
    for k, v in cfg.items():
        out += _keys(v, f"{prefix}{k}.") if isinstance(v, DictConfig) else [f"{prefix}{k}"]
    return out


def validate(cfg: DictConfig) -> None:
    """Errors a user can fix, caught before any process or model is started (preflight.options has the checks)."""
    options.check(cfg, TASKS)


# --- running, on one rank or many


def report(cfg: DictConfig, run_dir: Path, result: dict, samples: list[dict]) -> None:
    """results.json in the run directory, and the W&B run (offline unless configured otherwise)."""
    (run_dir / "results.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    if cfg.wandb.mode == "disabled":
        return
    import wandb

    run = wandb.init(
        mode=cfg.wandb.mode,
        project=cfg.wandb.project,
        entity=cfg.wandb.entity,
        config=OmegaConf.to_container(cfg, resolve=True),
        dir=os.environ.get("WANDB_DIR") or str(run_dir),
        name=f"{cfg.task.name}-{cfg.model.name}-{cfg.attention.name}-{cfg.ctx.name}",
    )
    run.log({k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    if samples:
        columns = list(samples[0])
        run.log(
            {
                "samples": wandb.Table(
                    columns=columns,
                    data=[[json.dumps(r[k]) if isinstance(r[k], list) else r[k] for k in columns] for r in samples],
                )
            }
        )
    if result.get("plot"):
        run.log({"ruler_heatmap": wandb.Image(result["plot"])})
    run.finish()


def worker(cfg_dict: dict, run_dir: str) -> dict:
    """One rank's whole run. Rank 0 writes results.json and the W&B run, and returns the result."""
    cfg = OmegaConf.create(cfg_dict)
    rank, _, device = init_ranks(cfg.parallel.backend, cfg.parallel.timeout_s)
    if cfg.device != "auto":
        device = torch.device(cfg.device)
    layout = make_layout(cfg.parallel.tp, device)
    if rank:
        os.environ["TQDM_DISABLE"] = "1"
    torch.manual_seed(cfg.seed)
    try:
        if cfg.memory.check:  # self-launched GPU ranks: each checks its own GPU before loading
            memory.check_fits(cfg, device)
            if dist.is_initialized():  # a chunk chosen to fit: the smallest any rank chose, the same on all
                chunks: list = [None] * dist.get_world_size()
                dist.all_gather_object(chunks, cfg.ctx.get("chunk"))
                cfg.ctx.chunk = min((c for c in chunks if c is not None), default=None)
        c = Context(cfg, Path(run_dir), rank, layout, device)
        result = TASKS[cfg.task.name].run(c)
        if rank == 0:
            report(cfg, Path(run_dir), result, c.samples)
        return result
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_dir = HydraConfig.get().runtime.output_dir
    try:
        if under_torchrun():
            options.take_launcher_world(cfg, int(os.environ["WORLD_SIZE"]))
        validate(cfg)
        if not TASKS[cfg.task.name].needs_model:
            TASKS[cfg.task.name].run(cfg, Path(run_dir))
            return
        # Self-launched GPU ranks check their own GPUs (asking here would hold a CUDA context on each meanwhile).
        in_ranks = cfg.parallel.nproc > 1 and not under_torchrun() and options.resolve_device(cfg.device).type == "cuda"
        if cfg.memory.check and not in_ranks:
            memory.check_fits(cfg, options.resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", 0))))
        container = OmegaConf.to_container(cfg, resolve=True)
        container["memory"]["check"] = cfg.memory.check and in_ranks  # what is left for the ranks to check
        if cfg.parallel.nproc > 1 and not under_torchrun():
            launch(cfg.parallel.nproc, worker, container, run_dir)
        else:
            worker(container, run_dir)
    except (KeyboardInterrupt, Interrupted) as e:  # one line, and where what was done so far is
        if os.environ.get("LONGCTX_TRACEBACK"):
            raise
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        kept = cfg.task.get("output_jsonl") or cfg.task.get("results_file") or run_dir
        print(f"interrupted (signal {signum}): what was written is kept in {kept}", file=sys.stderr)
        sys.exit(128 + signum)
    except Exception as e:  # the one error boundary: one line naming the input at fault; the traceback on request
        if os.environ.get("LONGCTX_TRACEBACK"):
            raise
        known = isinstance(e, (ValueError, OSError, RankFailed))
        message = " ".join(str(e).split()) if known else f"{type(e).__name__}: {' '.join(str(e).split())}"
        print(f"error: {message} (LONGCTX_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        sys.exit(2 if known else 1)


class MultirunComparison(Callback):
    """After `python runner.py -m ...`, one table comparing every job's results."""

    KEYS = ("ttft_s", "decode_tok_s", "prefill_tok_s", "ruler/mean", "demo_fact_found")

    @staticmethod
    def _overrides(job_dir: Path) -> list[str]:
        path = job_dir / ".hydra" / "overrides.yaml"
        return list(OmegaConf.load(path)) if path.is_file() else []

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)
        jobs = sorted(sweep.glob("*/results.json"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
        labels = [self._overrides(job.parent) for job in jobs]
        shared = set.intersection(*(set(o) for o in labels)) if labels else set()
        rows = [
            [" ".join(o for o in overrides if o not in shared) or job.parent.name]
            + [_cell(json.loads(job.read_text()).get(k)) for k in self.KEYS]
            for job, overrides in zip(jobs, labels)
        ]
        if not rows:
            return
        header = ["job", *self.KEYS]
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        lines = ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)) for r in [header, *rows]]
        text = "\n".join(lines)
        (sweep / "comparison.txt").write_text(text + "\n")
        print(f"\n{text}\n(also in {sweep / 'comparison.txt'})")


def _terminated(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.3g}"
    return str(v)


if __name__ == "__main__":
    try:
        precheck(sys.argv[1:])
    except options.OptionError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    signal.signal(signal.SIGTERM, _terminated)  # SIGTERM unwinds like Ctrl-C: files closed, one line
    main()
