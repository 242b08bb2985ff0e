"""Check the CUDA attention path against float64 dense attention, and the model on CUDA against the CPU.

    python tools/check_cuda.py                          # one GPU; exits non-zero on any failure
    torchrun --nproc-per-node 2 tools/check_cuda.py     # also ring, star and tensor parallel over NCCL against one GPU
    python tools/check_cuda.py --fp8 --int8             # the KV cache in these one-byte formats only (also --quick,
                                                        # --flex, --hsr: those paths only)

Prints one line per case with the largest error relative to the reference's largest magnitude.
"""

from __future__ import annotations

import itertools
import sys

import torch

from longctx import attention
from longctx.attention.kernels import PositionMask, attend, dense_attend
from longctx.attention.fusion import COMPILE_ELEMENTWISE
from longctx.models import ModelArgs, random_model

TOLERANCE = {torch.bfloat16: 1e-2, torch.float32: 1e-4}


def _random_on(args: ModelArgs, dtype: torch.dtype, strategy, device, tp=None):
    """Random weights drawn on the CPU (the same on every device and rank; with `tp`, this rank's slices of them),
    then moved to `device`."""
    model = random_model(args, dtype, "cpu", strategy, tp=tp).to(device)
    model.init_buffers(device)
    return model


def kernel_cases() -> list[tuple[str, PositionMask, int, int]]:
    """(name, mask, query heads, kv heads): sizes on and off the 128-token tiles, windows, star, empty rows."""
    ar = torch.arange
    return [
        ("causal 4096", PositionMask(ar(4096), ar(4096)), 32, 8),
        ("causal 1000 (off-tile)", PositionMask(ar(1000), ar(1000)), 32, 8),
        ("window 300 over 2500", PositionMask(ar(2500), ar(2500), 300), 28, 4),
        ("star blocks 777, anchor 512", PositionMask(ar(3000), ar(3000), None, 777, 512), 32, 8),
        ("decode 1 query over 5000", PositionMask(ar(4999, 5000), ar(5000)), 32, 8),
        (
            "query over cache with empty slots",
            PositionMask(ar(900, 905), torch.cat([ar(900), torch.full((100,), -1)])),
            32,
            8,
        ),
        ("queries before all keys", PositionMask(ar(0, 130), ar(200, 400)), 8, 8),
        ("ring diagonal step (zig-zag chunks)", PositionMask(*[torch.cat([ar(700), ar(2100, 2800)])] * 2), 32, 8),
        (
            "star 2nd rank, anchor received",
            PositionMask(ar(2000, 3000), torch.cat([ar(500), ar(2000, 3000)]), None, 500, 500),
            32,
            8,
        ),
        (
            "queries over a cache, empty slots",
            PositionMask(ar(900, 1100), torch.cat([ar(1100), torch.full((60,), -1)])),
            32,
            8,
        ),
    ]


def check_kernels() -> bool:
    from longctx.attention import fused

    with fused.FUSED_MIN_KEYS_PER_QUERY.scoped(0):  # these masks are short: merged pieces at any length
        ok = True
        g = torch.Generator(device="cuda").manual_seed(0)
        for dtype in (torch.bfloat16, torch.float32):
            for name, mask, hq, hkv in kernel_cases():
                T, S = mask.q_pos.numel(), mask.kv_pos.numel()
                q = torch.randn(1, hq, T, 128, device="cuda", generator=g).to(dtype)
                k = torch.randn(1, hkv, S, 128, device="cuda", generator=g).to(dtype)
                v = torch.randn(1, hkv, S, 128, device="cuda", generator=g).to(dtype)
                cuda_mask = PositionMask(
                    mask.q_pos.cuda(), mask.kv_pos.cuda(), mask.window, mask.block_size, mask.anchor_size
                )
                out, lse = attend(q, k, v, cuda_mask, return_lse=True)
                ref, ref_lse = dense_attend(q.double(), k.double(), v.double(), cuda_mask, return_lse=True)
                err = ((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
                seen = torch.isfinite(ref_lse)
                lse_err = (lse.double()[seen] - ref_lse[seen]).abs().max().item() if seen.any() else 0.0
                empty_ok = bool(torch.isinf(lse[~seen]).all() and (out[~seen.unsqueeze(-1).expand_as(out)] == 0).all())
                good = err <= TOLERANCE[dtype] and lse_err <= 1e-2 and empty_ok
                ok &= good
                print(
                    f"{'ok  ' if good else 'FAIL'} {str(dtype):15} {name:36} rel err {err:.2e}  lse err {lse_err:.2e}  empty rows {empty_ok}"
                    f"  path {_path(q, k, cuda_mask)}"
                )
        return ok


def _path(q, k, mask: PositionMask) -> str:
    from longctx.attention.kernels import fused_plan, use_flex

    if not use_flex(q):
        return "decode"
    plan = fused_plan(q, k, mask)
    return "flex" if plan is None else f"fused ({len(plan[1])} calls)"


def check_fused_model() -> bool:
    """bf16 models whose phase 1 runs on the fused kernels (full-attention layers; Gemma's windows stay on Flex)
    against the same models on FlexAttention alone, relative to the logits' scale."""
    from longctx.attention import fused

    with fused.FUSED_MIN_KEYS_PER_QUERY.scoped(0):  # merged pieces at any length
        tokens = torch.randint(0, 1000, (1, 1500))
        args = _llama_like(head_dim=64, max_seq_len=4096)
        ok = True
        for family, shape in (("llama", args), ("gemma", ModelArgs(**GEMMA_LIKE, max_seq_len=4096))):
            for name, params in (("global", {}), ("star", {"block_size": 384}), ("ring", {})):
                model = _random_on(shape, torch.bfloat16, attention.build(name, **params), "cuda")
                outs, kernels = [], fused.FUSED_KERNELS.get()
                for table in (kernels, {}):
                    with torch.no_grad(), fused.FUSED_KERNELS.scoped(table):
                        outs.append(model(tokens.cuda(), torch.arange(1500, device="cuda")).float())
                err = ((outs[0] - outs[1]).abs().max() / outs[1].abs().max()).item()
                good = err < 3e-2 and bool(kernels)
                ok &= good
                print(
                    f"{'ok  ' if good else 'FAIL'} model {family} {name:8} bf16 logits, fused pieces vs FlexAttention: rel diff {err:.2e}"
                )
        return ok


def check_lean() -> bool:
    """The Lean decode kernel against float64 dense attention, on and off the key tiles, with GQA 4 and 8.

    Many programs share each head on the larger cases; 20 launches must give identical bits (the split and the
    merge order are fixed, so the result must not depend on which program finishes first).
    """
    from longctx.attention import lean

    ok = True
    g = torch.Generator(device="cuda").manual_seed(1)
    ar = torch.arange
    cases = [
        ("decode, 1 query, 8191 keys", 1, 32, 8, ar(8190, 8191), ar(8191), None, 128),
        ("decode, batch 4, 100003 keys", 4, 32, 4, ar(100002, 100003), ar(100003), None, 128),
        ("decode, 1M keys, GQA 4", 1, 32, 8, ar(2**20 - 1, 2**20), ar(2**20), None, 128),
        ("decode, 1 KV head, 300001 keys, GQA 8", 1, 8, 1, ar(300000, 300001), ar(300001), None, 128),
        ("decode, window 4096", 2, 28, 4, ar(20000, 20001), ar(20001), 4096, 128),
        (
            "3 queries over a cache with empty slots",
            1,
            32,
            8,
            ar(5000, 5003),
            torch.cat([ar(5003), torch.full((997,), -1)]),
            None,
            128,
        ),
        ("8 queries, GQA 8", 1, 64, 8, ar(3000, 3008), ar(3008), None, 128),
        ("64 queries in chunks, GQA 4", 1, 32, 8, ar(9000, 9064), ar(9064), None, 128),
        ("head dim 256, 20000 keys", 1, 16, 4, ar(19999, 20000), ar(20000), None, 256),
    ]
    for dtype in (torch.bfloat16, torch.float32):
        for name, B, hq, hkv, q_pos, kv_pos, window, D in cases:
            mask = PositionMask(q_pos.cuda(), kv_pos.cuda(), window)
            q = torch.randn(B, hq, len(q_pos), D, device="cuda", generator=g).to(dtype)
            k = torch.randn(B, hkv, len(kv_pos), D, device="cuda", generator=g).to(dtype)
            v = torch.randn(B, hkv, len(kv_pos), D, device="cuda", generator=g).to(dtype)
            if not lean.supports(q, k, mask):  # fp32 tiles of head dim 256 overflow shared memory: the dense path
                good = dtype == torch.float32 and D == 256
                ok &= good
                print(
                    f"{'ok  ' if good else 'FAIL'} lean {str(dtype):15} {name:42} not taken (tiles exceed shared memory)"
                )
                continue
            out, lse = lean.lean_attend(q, k, v, mask)
            repeats = [lean.lean_attend(q, k, v, mask) for _ in range(20)]
            same = all(torch.equal(o, out) and torch.equal(l, lse) for o, l in repeats)
            ref, ref_lse = dense_attend(q.double(), k.double(), v.double(), mask, return_lse=True)
            err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
            lse_err = (lse.double() - ref_lse).abs().max().item()
            good = err <= TOLERANCE[dtype] and lse_err <= 1e-2 and same
            ok &= good
            print(
                f"{'ok  ' if good else 'FAIL'} lean {str(dtype):15} {name:42} rel err {err:.2e}  lse err {lse_err:.2e}  "
                f"20 launches identical {same}"
            )
            del q, k, v, ref
    return ok


def check_hsr() -> bool:
    """HSR sparse decode on CUDA (Triton bounds, Lean over a tile list): its certificate holds against float64 dense
    attention, it reads what the PyTorch path reads, the selection in one launch and in three agree, and it replays
    from a CUDA graph with the same result."""
    from longctx.attention import hsr_triton
    from longctx.attention.hsr import KeySummary, error_bound, hsr_attend

    ok = True
    g = torch.Generator(device="cuda").manual_seed(2)
    ar = torch.arange
    cases = [  # name, batch, query heads, kv heads, query positions, slot positions, window, head dim, block
        ("1 query, 100000 keys, GQA 4", 1, 32, 8, ar(99999, 100000), ar(100000), None, 128, 64),
        ("batch 2, window 4096, 30000 keys", 2, 28, 4, ar(29999, 30000), ar(30000), 4096, 128, 32),
        (
            "3 queries, empty slots",
            1,
            32,
            8,
            ar(5000, 5003),
            torch.cat([ar(5003), torch.full((997,), -1)]),
            None,
            128,
            128,
        ),
        ("head dim 256, 1 KV head, 20000 keys", 1, 4, 1, ar(19999, 20000), ar(20000), None, 256, 16),
    ]
    for dtype in (torch.bfloat16, torch.float32):
        for name, B, hq, hkv, q_pos, kv_pos, window, D, block in cases:
            mask = PositionMask(q_pos.cuda(), kv_pos.cuda(), window)
            S = len(kv_pos)
            # keys in runs of 64 near one of 16 centres (text has topics), the query near one of them
            centres = torch.randn(16, D, device="cuda", generator=g) * 2
            pick = torch.randint(0, 16, (B, hkv, S // 64 + 1), device="cuda", generator=g)
            k = (
                centres[pick].repeat_interleave(64, 2)[:, :, :S]
                + 0.3 * torch.randn(B, hkv, S, D, device="cuda", generator=g)
            ).to(dtype)
            v = torch.randn(B, hkv, S, D, device="cuda", generator=g).to(dtype)
            q = (centres[3] + 0.3 * torch.randn(B, hq, len(q_pos), D, device="cuda", generator=g)).to(dtype)
            summary = KeySummary.of(k, mask.kv_pos, block)
            r = hsr_attend(q, k, v, mask, summary, 1e-3, 64, 256)
            cpu = hsr_attend(
                q.cpu(),
                k.cpu(),
                v.cpu(),
                PositionMask(q_pos, kv_pos, window),
                KeySummary.of(k.cpu(), kv_pos, block),
                1e-3,
                64,
                256,
            )
            ref, ref_lse = dense_attend(q.double(), k.double(), v.double(), mask, return_lse=True)
            seen = mask.dense()[None, None, :, :, None]
            vv = v.double().repeat_interleave(hq // hkv, 1)[:, :, None]
            v_range = torch.where(seen, vv, -torch.inf).amax(3) - torch.where(seen, vv, torch.inf).amin(3)
            allowed = error_bound(r.certificate.double(), v_range) + TOLERANCE[dtype] * ref.abs().max()
            within = bool(((r.out.double() - ref).abs() <= allowed).all())
            gap = ref_lse - r.lse.double()
            lse_ok = bool((gap >= -1e-2).all() and (gap <= torch.log1p(r.certificate.double()) + 1e-2).all())
            same_reads = (r.blocks_read.cpu() - cpu.blocks_read).abs().max().item()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                again = hsr_attend(q, k, v, mask, summary, 1e-3, 64, 256)
            summary.dense_until.zero_()  # (as r began)
            graph.replay()
            replayed = torch.equal(again.out, r.out) and torch.equal(again.blocks_read, r.blocks_read)
            # the selection's other launch plan (one launch where the cache has few blocks, three otherwise)
            summary.dense_until.zero_()
            with hsr_triton.SELECT_ALONE.scoped(
                0 if summary.count.numel() <= hsr_triton.SELECT_ALONE.get() else 1 << 30
            ):
                other = hsr_attend(q, k, v, mask, summary, 1e-3, 64, 256)
            plans_agree = torch.equal(other.blocks_read, r.blocks_read) and torch.equal(other.out, r.out)
            plans_agree &= bool(torch.allclose(other.certificate, r.certificate, rtol=1e-4, atol=1e-12))
            # a step of heads that read every block: exact attention, certificate 0, the state left as it was
            until = int(q_pos.max()) + 2
            summary.dense_until.fill_(until)
            every = hsr_attend(q, k, v, mask, summary, 1e-3, 64, 256)
            dense_ok = (
                bool(((every.out.double() - ref).abs() <= TOLERANCE[dtype] * ref.abs().max()).all())
                and float(every.certificate.max()) == 0
            )
            dense_ok &= bool((every.blocks_read == every.blocks_visible).all()) and bool(
                (summary.dense_until == until).all()
            )
            # a decode step's summary update in one kernel, as the scatters
            slots = torch.tensor([S - 3, S - 2, S // 2], device="cuda")
            fresh = torch.randn(B, hkv, 3, D, device="cuda", generator=g).to(dtype)
            one, scattered = (KeySummary.of(k, mask.kv_pos, block) for _ in range(2))
            one.update(slots, fresh, slots + 7)
            scattered.scatter(slots, fresh, slots + 7)
            update_ok = all(
                torch.equal(getattr(one, f), getattr(scattered, f)) for f in ("kmin", "kmax", "count", "pmin", "pmax")
            )
            share = float(r.blocks_read.float().mean() / r.blocks_visible)
            good = (
                within
                and lse_ok
                and same_reads <= 1
                and replayed
                and plans_agree
                and dense_ok
                and update_ok
                and float(r.certificate.max()) <= 1e-3
            )
            ok &= good
            print(
                f"{'ok  ' if good else 'FAIL'} hsr {str(dtype):15} {name:36} read {share:6.1%}  within certificate {within}  "
                f"lse {lse_ok}  reads vs CPU path differ by {same_reads}  graph replay identical {replayed}  "
                f"one launch and three agree {plans_agree}  all blocks when told {dense_ok}  summary update {update_ok}"
            )
    return ok


def _llama_like(head_dim: int, max_seq_len: int, n_layers: int = 2, layer_windows: tuple = ()) -> ModelArgs:
    """A small Llama-shaped model: 8 query heads over 2 KV heads, the layers' sliding windows as given."""
    return ModelArgs(
        vocab_size=1000,
        dim=256,
        n_layers=n_layers,
        n_heads=8,
        n_kv_heads=2,
        head_dim=head_dim,
        intermediate_size=512,
        max_seq_len=max_seq_len,
        layer_windows=layer_windows,
    )


# Gemma 3's features: head dim 256 with one KV head, sliding layers with their own rope base around a full layer,
# offset norms before and after attention and MLP, scaled embeddings, a GELU MLP, another query scale, capped logits.
GEMMA_LIKE = dict(
    vocab_size=1000,
    dim=256,
    n_layers=3,
    n_heads=4,
    n_kv_heads=1,
    head_dim=256,
    intermediate_size=512,
    layer_windows=(200, None, 200),
    rope_theta=1e6,
    local_rope_theta=1e4,
    embed_scale=16.0,
    norm_offset=1.0,
    sandwich_norms=True,
    mlp_act="gelu_tanh",
    qk_norm=True,
    attn_scale=0.08,
    final_softcap=30.0,
)


def check_graphs() -> bool:
    """Decode replayed from a CUDA graph generates the tokens of eager decode, for global and star; running a step
    ahead (the default) those of reading each token first."""
    from longctx.models.generate import generate_tokens

    llama = _llama_like(head_dim=64, max_seq_len=8192, layer_windows=(None, 300))
    prompt = torch.randint(0, 1000, (700,), generator=torch.Generator().manual_seed(3)).tolist()
    ok = True
    for family, args in (("llama", llama), ("gemma", ModelArgs(**GEMMA_LIKE, max_seq_len=8192))):
        hsr = {"name": "hsr", "eps": 1e-3, "block": 32, "sink": 32, "recent": 64}
        for name, params, decode in (
            ("global", {}, None),
            ("star", {"block_size": 200}, None),
            ("global", {}, hsr),
            ("star", {"block_size": 200}, hsr),
        ):
            strategy = attention.build(name, decode=attention.build_decode(decode), **params)
            model = _random_on(args, torch.bfloat16, strategy, "cuda")
            runs = [
                list(generate_tokens(model, prompt, 40, context_len=650, cuda_graphs=g, ahead=a))
                for g, a in ((False, False), (True, True), (True, False))
            ]
            good = runs[0] == runs[1] == runs[2] and len(runs[0]) == 40
            ok &= good
            print(
                f"{'ok  ' if good else 'FAIL'} CUDA-graph decode ({family}, {name}, {strategy.decode.name}), ahead or "
                f"not, generates the eager tokens: {good}"
            )
    return ok


def check_model() -> bool:
    """Random Llama- and Gemma-shaped models, and scaled ropes past their original context: CUDA fp32 logits
    (global, star, ring) equal the CPU's."""
    args = _llama_like(head_dim=32, max_seq_len=4096, layer_windows=(None, 200))
    tokens = torch.randint(0, 1000, (1, 700))
    ok = True
    shapes = [("llama", args), ("gemma", ModelArgs(**GEMMA_LIKE, max_seq_len=4096))]
    for family, shape in shapes + [(f"{kind} rope", _scaled(kind)) for kind in SCALED]:
        for name, params in (("global", {}), ("star", {"block_size": 256}), ("ring", {})):
            outs = []
            for device in ("cpu", "cuda"):
                model = _random_on(shape, torch.float32, attention.build(name, **params), device)
                with torch.no_grad():
                    outs.append(model(tokens.to(device), torch.arange(700, device=device)).cpu())
            err = (outs[0] - outs[1]).abs().max().item()
            good = err < 1e-3
            ok &= good
            print(
                f"{'ok  ' if good else 'FAIL'} model {family} {name:8} CUDA vs CPU fp32 logits: max abs diff {err:.2e}"
            )
    # bf16: the compiled norm/rotary/SwiGLU keep fp32 intermediates where eager rounds each op to bf16, so compare
    # the two on the same GPU relative to the logits' scale.
    model = _random_on(args, torch.bfloat16, attention.build("global"), "cuda")
    outs = []
    for fused in (True, False):
        with COMPILE_ELEMENTWISE.scoped(fused), torch.no_grad():
            outs.append(model(tokens.cuda(), torch.arange(700, device="cuda")).float())
    err = ((outs[0] - outs[1]).abs().max() / outs[1].abs().max()).item()
    good = err < 3e-2
    ok &= good
    print(f"{'ok  ' if good else 'FAIL'} model bf16 logits, compiled vs eager norm/rotary/SwiGLU: rel diff {err:.2e}")
    return ok


# Length-dependent and partial ropes: LongRoPE on half of each head (Phi-3's re-encode when generation first runs
# past the original context), dynamic NTK (new frequencies every step), YaRN; an original context of 256 positions.
SCALED = {
    "longrope": dict(
        partial_rotary_factor=0.5,
        reencode_past_original=True,
        rope_scaling={
            "rope_type": "longrope",
            "original_max_position_embeddings": 256,
            "short_factor": [1.0 + i / 16 for i in range(16)],
            "long_factor": [1.0 + i for i in range(16)],
            "attention_factor": 1.2,
        },
    ),
    "dynamic": dict(rope_scaling={"rope_type": "dynamic", "factor": 4.0, "max_position_embeddings": 256}),
    "yarn": dict(
        rope_scaling={
            "rope_type": "yarn",
            "factor": 8.0,
            "original_max_position_embeddings": 256,
            "attention_factor": 1.2,
            "beta_fast": 32,
            "beta_slow": 1,
            "truncate": True,
        }
    ),
}


def _scaled(kind: str) -> ModelArgs:
    return ModelArgs(**{**vars(_llama_like(head_dim=64, max_seq_len=4096)), **SCALED[kind]})


def check_scaled() -> bool:
    """Scaled ropes on CUDA: CUDA-graph decode across the original context generates the eager tokens (check_model
    compares their logits with the CPU's)."""
    from longctx.models.generate import generate_tokens

    prompt = torch.randint(0, 1000, (200,), generator=torch.Generator().manual_seed(4)).tolist()
    ok = True
    for kind in SCALED:
        model = _random_on(_scaled(kind), torch.bfloat16, attention.build("star", block_size=100), "cuda")
        runs = [list(generate_tokens(model, prompt, 100, context_len=180, cuda_graphs=g)) for g in (False, True)]
        good = runs[0] == runs[1] and len(runs[0]) == 100
        ok &= good
        print(f"{'ok  ' if good else 'FAIL'} {kind} rope: CUDA-graph decode past the original context = eager: {good}")
    return ok


def check_recompiles() -> bool:
    """Compiled FlexAttention compiles once per mask kind and shape: not once per layer, not again on the next forward."""
    from torch._dynamo.utils import counters

    args = _llama_like(head_dim=64, max_seq_len=8192, n_layers=6, layer_windows=(None, 300) * 3)
    tokens = torch.randint(0, 1000, (1, 2048), device="cuda")
    ok = True
    for name, params in (("global", {}), ("star", {"block_size": 512})):
        model = _random_on(args, torch.bfloat16, attention.build(name, **params), "cuda")
        graphs = []
        for _ in range(2):
            before = counters["stats"]["unique_graphs"]
            with torch.no_grad():
                model(tokens, torch.arange(2048, device="cuda"))
            graphs.append(counters["stats"]["unique_graphs"] - before)
        # Per window size the block-mask build and the attention, plus the fused elementwise chains (models.transformer)
        # the first time they see this shape; once per layer would be 12 or more.
        good = graphs[0] <= 9 and graphs[1] == 0
        ok &= good
        print(
            f"{'ok  ' if good else 'FAIL'} {name}: compiled graphs in the first forward {graphs[0]} (2 windows, 6 layers: at most 9), "
            f"in the second {graphs[1]}"
        )
        # ten lengths within one bucket (2049..2304): the first compiles that bucket's shapes (and turns the
        # elementwise chains dynamic); FlexAttention's shapes are padded to it, so the other nine compile nothing
        compiled = []
        with torch.no_grad():
            for n in range(2100, 2300, 20):
                before = counters["stats"]["unique_graphs"]
                model(tokens[:, :1].repeat(1, n), torch.arange(n, device="cuda"))
                compiled.append(counters["stats"]["unique_graphs"] - before)
        good = sum(compiled[1:]) == 0
        ok &= good
        print(
            f"{'ok  ' if good else 'FAIL'} {name}: ten lengths in one bucket compiled {compiled[0]} graphs, then {compiled[1:]}"
        )
    return ok


def check_ranks() -> bool:
    """Under torchrun: ring and star (both anchor modes) over NCCL equal the same strategy on one GPU; so does tensor
    parallelism over all GPUs (global on one host) and, on 4 or more, 2 hosts × tp=world/2 for ring and star."""
    import torch.distributed as dist

    from longctx.parallel.launch import init_ranks
    from longctx.parallel.layout import make_layout

    rank, world, device = init_ranks("nccl", 120)
    star = {"block_size": 300}
    cases = [
        (1, "ring", {}),
        (1, "star", star | {"anchor_mode": "broadcast"}),
        (1, "star", star | {"anchor_mode": "recompute"}),
        (world, "global", {}),
    ]
    if world >= 4 and world % 2 == 0:
        cases += [(world // 2, name, params) for _, name, params in cases[:3]]
    ok = True
    for tp, name, params in cases:
        ok &= _compare_to_one_gpu(make_layout(tp, device), name, params, rank, world, device)
    flags = [ok]
    dist.broadcast_object_list(flags, src=0)
    dist.destroy_process_group()
    return flags[0]


RANKS_MODEL = _llama_like(head_dim=32, max_seq_len=8192, layer_windows=(None, 300))


def _compare_to_one_gpu(layout, name: str, params: dict, rank: int, world: int, device) -> bool:
    """Phase-1 logits and greedy tokens (eager and CUDA-graph decode) of `name` on this layout against one GPU."""
    import torch.distributed as dist

    from longctx.models.generate import generate_tokens

    args, n_ctx = RANKS_MODEL, 2000
    prompt = torch.randint(0, 1000, (2100,), generator=torch.Generator().manual_seed(0)).tolist()
    strategy = attention.build(name, group=layout.cp_group, **params)
    model = _random_on(args, torch.float32, strategy, device, layout.tensor_parallel(args))
    tokens = torch.tensor(prompt, device=device)
    with torch.no_grad():
        idx = strategy.context_indices(n_ctx).to(device)
        local = model(tokens[idx][None], idx)[0]
        skip = 300 if name == "star" and strategy.recomputes_anchor else 0
        local, own = local[skip:], idx[skip:]
    generated = list(generate_tokens(model, prompt, 8, context_len=n_ctx, cuda_graphs=False))
    graphed = list(generate_tokens(model, prompt, 8, context_len=n_ctx, cuda_graphs=True))
    parts = [None] * world
    dist.all_gather_object(parts, (own.cpu(), local.cpu(), generated, graphed))
    if rank != 0:
        return True
    one_params = params if name == "star" else {}
    ref_model = _random_on(args, torch.float32, _single_rank(name, one_params), device)
    with torch.no_grad():
        ref = ref_model(tokens[:n_ctx][None], torch.arange(n_ctx, device=device))[0].cpu()
    got = torch.empty_like(ref)
    for o, logits, *_ in parts:
        got[o] = logits
    err = (got - ref).abs().max().item()
    ref_gen = list(generate_tokens(ref_model, prompt, 8, context_len=n_ctx))
    same = all(p[2] == ref_gen for p in parts)
    same_graphed = all(p[3] == ref_gen for p in parts)
    good = err < 1e-3 and same and same_graphed
    print(
        f"{'ok  ' if good else 'FAIL'} {name} {params} on {layout.describe()} (NCCL) vs 1 GPU: max logit diff {err:.2e}, "
        f"same tokens {same}, same tokens with CUDA-graph decode {same_graphed}"
    )
    return good


def _single_rank(name: str, params: dict) -> attention.AttentionStrategy:
    """The strategy as one rank runs it, while this process belongs to a larger group."""
    strategy = attention.build(name, **params)
    strategy.rank, strategy.world = 0, 1
    return strategy


def check_one_byte(tag: str) -> bool:
    """The KV cache in one byte (`tag`: fp8 or int8, as `kv.dtype` names it) on CUDA: the Lean kernel (in-kernel
    scales, 1M keys included) and the dequantizing paths of long queries against float64 attention over the keys as
    stored; prefill logits against the CPU's; chunked phase 1 and CUDA-graph decode against eager, unchunked runs."""
    from longctx.attention import lean
    from longctx.attention.cache import KVCache, kernel_writes
    from longctx.attention.kernels import use_flex
    from longctx.attention.quant import (
        ONE_BYTE,
        dequantize,
        from_stored_frame,
        quantize,
        tile_values,
        to_stored_frame,
        value_rows,
    )
    from longctx.models.generate import generate_tokens, prefill

    ok = True
    stored = ONE_BYTE[tag]
    g = torch.Generator(device="cuda").manual_seed(5)
    ar = torch.arange
    cases = [
        ("decode, 1 query, 8191 keys", 1, 32, 8, ar(8190, 8191), ar(8191), None, 128),
        ("decode, 1M keys, GQA 4", 1, 32, 8, ar(2**20 - 1, 2**20), ar(2**20), None, 128),
        ("decode, window 4096", 2, 28, 4, ar(20000, 20001), ar(20001), 4096, 128),
        ("3 queries, empty slots", 1, 32, 8, ar(5000, 5003), torch.cat([ar(5003), torch.full((997,), -1)]), None, 128),
        ("64 queries in chunks", 1, 32, 8, ar(9000, 9064), ar(9064), None, 128),
        ("head dim 256, 20000 keys", 1, 16, 4, ar(19999, 20000), ar(20000), None, 256),
        ("2048 queries (fused, pieces)", 1, 32, 8, ar(150000, 152048), ar(152048), None, 128),
        ("star block mask, 300 queries", 1, 32, 8, ar(4000, 4300), ar(4300), None, 128),
    ]
    for name, B, hq, hkv, q_pos, kv_pos, window, D in cases:
        block = 1000 if name.startswith("star") else None
        mask = PositionMask(q_pos.cuda(), kv_pos.cuda(), window, block, 500 if block else 0)
        q = torch.randn(B, hq, len(q_pos), D, device="cuda", generator=g).bfloat16()
        k = (torch.randn(B, hkv, len(kv_pos), D, device="cuda", generator=g) * 4).bfloat16()
        v = torch.randn(B, hkv, len(kv_pos), D, device="cuda", generator=g).bfloat16()
        (k8, ks), (v8, vs) = quantize(k, stored), quantize(v, stored)
        del k, v
        kernel = "lean" if lean.supports(q, k8, mask) and not use_flex(q) else "pieces"
        # (the values as a cache keeps them)
        out, lse = attend(q, k8, tile_values(v8), mask, return_lse=True, scales=(ks, vs))
        # float64 attention over the keys and values as stored, of the queries as `attend` rotates them to that frame
        # and rounds them once (attention/quant.py; the Lean kernel rotates them in fp32 and rounds them to fp16, the
        # other paths to q's dtype), its output rotated back
        kd, vd = (dequantize(x, e, torch.float64) for x, e in ((k8, ks), (v8, vs)))  # (exact: a code times 2^e)
        rotated = to_stored_frame(q.double()).half() if kernel == "lean" else to_stored_frame(q)
        ref, ref_lse = dense_attend(rotated.double(), kd, vd, mask, return_lse=True)
        ref = from_stored_frame(ref)
        err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
        lse_err = (lse.double() - ref_lse).abs().max().item()
        good = err <= TOLERANCE[torch.bfloat16] and lse_err <= 1e-2
        ok &= good
        print(f"{'ok  ' if good else 'FAIL'} {tag} {kernel:6} {name:32} rel err {err:.2e}  lse err {lse_err:.2e}")
        del kd, vd, ref, k8, v8
    for D, given, n in itertools.product((64, 128, 256), (torch.bfloat16, torch.float32), (1, 3000)):
        # the cache's write (one Triton kernel on CUDA) stores the CPU's codes and exponents, bit for bit
        layer = KVCache(1, 2, 8, 4096, D, stored, "cuda").layers[0]
        k, v = ((torch.randn(2, n, 8, D, device="cuda", generator=g) * 4).to(given).transpose(1, 2) for _ in range(2))
        slots = torch.randperm(4096, device="cuda", generator=g)[:n]
        layer.write(slots, k, v)
        same = True
        for x, codes, exponents in ((k, layer.k, layer.k_scale), (v, layer.v, layer.v_scale)):
            want, want_exponents = quantize(x.cpu(), stored)
            same &= torch.equal(value_rows(codes, slots).cpu().view(torch.int8), want.view(torch.int8))
            same &= torch.equal(exponents[:, :, slots].cpu(), want_exponents)
        ok &= same
        kind = "kernel" if kernel_writes(k) else "torch"
        print(f"{'ok  ' if same else 'FAIL'} {tag} {kind:6} cache write, head dim {D}, {n} tokens {given}: CPU codes")
    args = _llama_like(head_dim=64, max_seq_len=8192, layer_windows=(None, 300))
    prompt = torch.randint(0, 1000, (900,), generator=torch.Generator().manual_seed(6))
    for name, params in (("global", {}), ("star", {"block_size": 200})):
        logits = []
        for device in ("cpu", "cuda"):
            strategy = attention.build(name, **params)
            strategy.kv_dtype = stored
            model = _random_on(args, torch.float32, strategy, device)
            model.setup_cache(1, 900, dtype=stored)
            with torch.inference_mode():
                logits.append(prefill(model, prompt.to(device), 850).cpu())
        err = (logits[0] - logits[1]).abs().max().item()
        good = err < 1e-3
        ok &= good
        print(
            f"{'ok  ' if good else 'FAIL'} {tag} model {name:6} CUDA vs CPU fp32 prefill logits: max abs diff {err:.2e}"
        )
        hsr = {"name": "hsr", "eps": 1e-3, "block": 32, "sink": 32, "recent": 64}
        for decode in (None, hsr):
            method = (decode or {"name": "dense"})["name"]
            last = {}
            for chunk in (None, 128):  # bf16: chunks round differently, so their logits are compared, not tokens
                strategy = attention.build(name, decode=attention.build_decode(decode), **params)
                strategy.kv_dtype, strategy.chunk = stored, chunk
                model = _random_on(args, torch.bfloat16, strategy, "cuda")
                model.setup_cache(1, 900, dtype=stored, summarize=strategy.summarize)
                with torch.inference_mode():
                    last[chunk] = prefill(model, prompt.cuda(), 850).float()
            err = ((last[None] - last[128]).abs().max() / last[None].abs().max()).item()
            runs = [list(generate_tokens(model, prompt.tolist(), 40, context_len=850, cuda_graphs=g)) for g in (0, 1)]
            good = err < 3e-2 and runs[0] == runs[1]
            ok &= good
            print(
                f"{'ok  ' if good else 'FAIL'} {tag} model {name:6} {method:5} bf16 chunked vs one-pass prefill "
                f"logits: rel diff {err:.2e}; CUDA-graph decode generates the eager tokens: {runs[0] == runs[1]}"
            )
    return ok


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return 0 if check_ranks() else 1
    print(f"{torch.cuda.get_device_name()} · torch {torch.__version__}")
    if "--quick" in sys.argv:  # the decode paths only
        return 0 if check_lean() & check_hsr() & check_graphs() & check_scaled() else 1
    if "--flex" in sys.argv:  # the prefill kernels: fused pieces and padded Flex shapes against float64, compiles
        return 0 if check_kernels() & check_fused_model() & check_recompiles() else 1
    if "--hsr" in sys.argv:
        return 0 if check_hsr() & check_graphs() else 1
    from longctx.attention.quant import ONE_BYTE

    asked = [name for name in ONE_BYTE if f"--{name}" in sys.argv]
    if asked:  # the KV cache in these one-byte formats only
        return 0 if all([check_one_byte(name) for name in asked]) else 1
    ok = check_kernels() & check_lean() & check_hsr() & check_graphs()
    ok &= check_model() & check_scaled() & check_fused_model() & check_recompiles()
    ok &= all([check_one_byte(name) for name in ONE_BYTE])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
