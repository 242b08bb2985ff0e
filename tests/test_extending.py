"""A new decode method or strategy is its own module in attention/ (and a conf/ yaml): here one of each is defined in
this file alone, found by name, checked by its schema and run through the model; and the shipped example
(attention/window.py, conf/decode/window.yaml) is found without any other file naming it."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from longctx import attention, models
from longctx.attention.cache import KVCache, LayerKV
from longctx.attention.decode import DecodeMethod, DenseDecode
from longctx.attention.kernels import attend
from longctx.attention.mask import PositionMask
from longctx.attention.strategy import AttentionStrategy, Step
from longctx.conf.schema import OptionError, check_node, option, schema_of
from longctx.models.generate import generate_tokens
from tests.distributed import run_ranks
from tests.helpers import compose_cfg, reference, run_runner

# --- a decode method in one class: only the keys of the last `blocks` blocks before the step's last query


@dataclass
class LastBlocks(DecodeMethod):
    name: ClassVar[str] = "last_blocks_example"
    blocks: int = option(2, "blocks read", low=1)
    block: int = option(16, "positions per block", low=1)

    def attend(self, q, kv: LayerKV, mask: PositionMask, group, world: int) -> torch.Tensor:
        first = (mask.q_pos.max() // self.block - self.blocks + 1) * self.block
        kept = torch.where(mask.kv_pos >= first, mask.kv_pos, -1)
        return DenseDecode().attend(q, kv, PositionMask(mask.q_pos, kept, mask.window), group, world)


def _cache(S: int, filled: int, seed: int = 0) -> KVCache:
    g = torch.Generator().manual_seed(seed)
    cache = KVCache(1, 1, 2, S, 8, torch.float32)
    cache.layers[0].write(
        cache.reserve(torch.arange(filled)),
        torch.randn(1, 2, filled, 8, generator=g),
        torch.randn(1, 2, filled, 8, generator=g),
    )
    return cache


def test_a_decode_method_is_one_class_found_by_name_and_checked_by_its_schema():
    assert attention.decode_class("last_blocks_example") is LastBlocks
    method = attention.build_decode({"name": "last_blocks_example", "blocks": 3, "block": 10})
    assert (method.blocks, method.block) == (3, 10)
    with pytest.raises(OptionError, match="decode.blocks must be a whole number >= 1"):
        check_node(LastBlocks, {"name": "last_blocks_example", "blocks": 0}, "decode", skip=("name",))
    with pytest.raises(OptionError, match="decode.stride is not an option of decode=last_blocks_example"):
        check_node(LastBlocks, {"name": "x", "stride": 2}, "decode", "decode=last_blocks_example", skip=("name",))
    with pytest.raises(OptionError, match="blocks must be a whole number"):
        LastBlocks(blocks=0)  # the constructor checks what the schema declares


class Plain(DenseDecode):
    """A method written without the dataclass: its options are its constructor's parameters, typed, without ranges."""

    name = "plain_example"

    def __init__(self, blocks: int = 4):
        self.blocks = blocks


def test_a_method_without_a_dataclass_takes_its_constructors_options():
    schema = schema_of(attention.decode_class("plain_example"))
    assert check_node(schema, {"name": "plain_example", "blocks": 3}, "decode", skip=("name",)) == {"blocks": 3}
    with pytest.raises(OptionError, match="decode.blocks must be a whole number; got 'x'"):
        check_node(schema, {"blocks": "x"}, "decode")
    with pytest.raises(OptionError, match="decode.stride is not an option"):
        check_node(schema, {"stride": 1}, "decode")


def test_a_new_decode_method_reads_what_it_says():
    """Phase 2 through a strategy built with it: attention over exactly the keys of its last blocks (float64 reference)."""
    cache = _cache(100, 90)
    strategy = attention.build("ring", decode=LastBlocks(blocks=2, block=16))
    strategy.set_phase("query")
    q = torch.randn(1, 4, 1, 8, generator=torch.Generator().manual_seed(1))
    new = torch.randn(1, 2, 1, 8)
    step = strategy.begin(cache, torch.tensor([90]), {None})
    out = strategy.attend(q, new, new, cache.layers[0], step, None)
    layer, pos = cache.layers[0], cache.positions.tolist()
    seen = [p if p >= 80 - 16 else -1 for p in pos]  # blocks 4 and 5 of 16: positions 64..90
    ref, _ = reference(q, layer.k, layer.v, [90], seen, None)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)


def test_a_new_decode_method_runs_through_the_model_and_equals_dense_where_it_reads_everything():
    args = models.ModelArgs(
        vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, intermediate_size=64, max_seq_len=512
    )
    prompt = torch.randint(0, 64, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    runs = {}
    for name, method in (
        ("dense", DenseDecode()),
        ("all", LastBlocks(blocks=100, block=16)),
        ("few", LastBlocks(blocks=1, block=4)),
    ):
        model = models.random_model(args, torch.float32, "cpu", attention.build("star", block_size=64, decode=method))
        runs[name] = list(generate_tokens(model, prompt, 6, context_len=190))
    assert runs["all"] == runs["dense"] and len(runs["few"]) == 6


# --- a strategy in one class: each block of the context attends to itself alone in phase 1


@dataclass
class BlockwiseParams:
    block: int = option(64, "tokens per block", low=1)


class Blockwise(AttentionStrategy):
    name = "blockwise_example"
    Params = BlockwiseParams

    def __init__(self, block: int, group=None, decode=None):
        super().__init__(group, decode)
        self.block = block

    def begin_context(self, cache: KVCache | None, positions, windows) -> Step:
        self._starts_empty(cache, self.name)
        slots = cache.reserve(positions) if cache is not None else None
        return Step("context", {w: PositionMask(positions, positions, w, self.block, 0) for w in windows}, slots)

    def attend_context(self, q, k, v, kv, step: Step, window):
        if step.slots is not None:
            kv.write(step.slots, k, v)
        return attend(q, k, v, step.masks[window])


def test_a_strategy_is_one_class_found_by_name_and_runs_through_the_model(hf_checkpoint):
    assert attention.strategy_class("blockwise_example") is Blockwise
    with pytest.raises(OptionError, match="attention.params.block must be a whole number >= 1"):
        check_node(Blockwise.Params, {"block": 0}, "attention.params")
    _, path = hf_checkpoint("llama3")
    model = models.load_model(path, dtype=torch.float32, attention=attention.build("blockwise_example", block=24))
    tokens = torch.randint(0, 96, (1, 60), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        blockwise = model(tokens, torch.arange(60))
        model.attention = attention.build("global")
        for start in range(0, 60, 24):  # each block alone, at its own positions, is what the strategy computes
            block = slice(start, min(start + 24, 60))
            alone = model(tokens[:, block], torch.arange(60)[block])
            torch.testing.assert_close(blockwise[:, block], alone, atol=1e-5, rtol=0)


# --- the shipped example: attention/window.py and conf/decode/window.yaml, which nothing else names


def test_the_window_decode_is_found_by_its_module_name_alone():
    check = (
        "from longctx import attention; assert 'window' not in attention.DECODE_METHODS; "
        "print(attention.decode_class('window').__module__)"
    )
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "longctx.attention.window", done.stderr[-2000:]


def _window_worker(rank, world, shards, q):
    pos, k, v = shards[rank]
    cache = KVCache(1, 1, 2, len(pos), 8, torch.float32)
    cache.layers[0].write(cache.reserve(pos), k, v)
    strategy = attention.build("ring", decode=attention.build_decode({"name": "window", "sink": 4, "recent": 20}))
    strategy.set_phase("query")
    return strategy.decode.attend(
        q, cache.layers[0], PositionMask(torch.tensor([99]), cache.positions), strategy.group, strategy.world
    )


@pytest.mark.parametrize("world", [1, 2])
def test_the_window_decode_reads_the_sink_and_the_latest_tokens_over_ranks(world):
    g = torch.Generator().manual_seed(world)
    k, v = torch.randn(1, 2, 100, 8, generator=g), torch.randn(1, 2, 100, 8, generator=g)
    q = torch.randn(1, 4, 1, 8, generator=g)
    order = torch.randperm(100, generator=g)  # every rank holds a scattered share of the positions
    shards = [
        (order[r::world].sort().values, k[:, :, order[r::world].sort().values], v[:, :, order[r::world].sort().values])
        for r in range(world)
    ]
    outs = run_ranks(world, _window_worker, shards, q) if world > 1 else [_window_worker(0, 1, shards, q)]
    seen = [p if p < 4 or p > 99 - 20 else -1 for p in range(100)]
    ref, _ = reference(q, k, v, [99], seen, None)
    for out in outs:
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)


def test_the_runner_takes_the_window_decode_and_refuses_its_bad_options(smollm2_dir, tmp_path):
    from longctx import runner

    runner.validate(compose_cfg("decode=window", "decode.recent=512"))
    with pytest.raises(OptionError, match="decode.recent must be a whole number >= 1"):
        runner.validate(compose_cfg("decode=window", "decode.recent=0"))
    res = run_runner(
        tmp_path, "decode=window", "attention=global", "task.max_new_tokens=8", "wandb.mode=disabled", timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
