"""Decode steps captured once as a CUDA graph and replayed: one launch per token instead of hundreds.

The step's inputs (token, position) live in static buffers, the token copied there on the device, where it was
drawn; the KV cache claims its next slot from a counter on the device (`KVCache.fill`), so every replay appends
where the last one stopped. Across ranks (NCCL), every rank captures and replays its step together with the others,
the phase-2 all-gather of (output, lse) included; a replay advances the cache's host count by what the captured step
claimed (`KVCache.capture`, `replayed`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from longctx.models.transformer import Transformer


class GraphedDecoder:
    def __init__(self, model: Transformer):
        self.model = model
        device = model.tok_embeddings.weight.device
        self.token = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: Tensor | None = None
        self.steps = 0

    def step(self, token: Tensor, position: int) -> Tensor:
        """Logits [1, 1, vocab] of `token` (one id, on the device) at `position`, attending to (and appended to) the KV
        cache."""
        self.token.copy_(token.view(1, 1))
        self.position.fill_(position)
        self.steps += 1
        if self.steps == 1:  # the first step runs eagerly: it compiles kernels and fills the caches they keep
            return self.model(self.token, self.position)
        if self.graph is None:
            self.graph = torch.cuda.CUDAGraph()
            # what the step claims (1 slot, or 0 on a rank that does not keep new tokens) is what each replay claims
            with self.model.cache.capture() as self.claim, torch.cuda.graph(self.graph):
                self.logits = self.model(self.token, self.position)
        self.graph.replay()
        self.model.cache.replayed(self.claim)
        return self.logits
