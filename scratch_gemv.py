import torch, torch.nn.functional as F
torch.manual_seed(0)
def gtime(fn, n=50):
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3): fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n): fn()
    g.replay(); torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(True), torch.cuda.Event(True)
    e0.record()
    for _ in range(5): g.replay()
    e1.record(); torch.cuda.synchronize()
    return e0.elapsed_time(e1) / 5 / n * 1e3  # us
for out_f, in_f, name in ((4096, 4096, "wo"), (6144, 4096, "wqkv"), (28672, 4096, "w13"), (4096, 14336, "w2"), (128256, 4096, "output")):
    W = torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, 1, in_f, device="cuda", dtype=torch.bfloat16)
    gb = W.numel() * 2 / 1e9
    res = {}
    res["linear"] = gtime(lambda: F.linear(x, W))
    res["mv"] = gtime(lambda: torch.mv(W, x.view(-1)))
    res["W@xT"] = gtime(lambda: W @ x.view(-1, 1))
    print(name, " ".join(f"{k} {v:.1f}us {gb / v * 1e6 / 1e3:.2f}TB/s" for k, v in res.items()), flush=True)
