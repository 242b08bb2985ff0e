"""`decode=window`: phase 2 reads only the first `sink` tokens and the latest `recent` ones (attention sinks and a
sliding window, as StreamingLLM): a fixed cost per step whatever the context, and approximate (what lies between is
never read). A baseline to set beside HSR's certified selection, and the example of attention/README.md: a decode
method is this file and conf/decode/window.yaml, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist
from torch import Tensor

from longctx.attention.cache import LayerKV
from longctx.attention.decode import DenseDecode
from longctx.attention.mask import PositionMask
from longctx.conf.schema import option


@dataclass
class WindowDecode(DenseDecode):
    name: ClassVar[str] = "window"
    sink: int = option(64, "the first tokens, always read", low=0)
    recent: int = option(1024, "the tokens up to the step's last query that every query reads", low=1)

    def attend(self, q: Tensor, kv: LayerKV, mask: PositionMask, group: dist.ProcessGroup | None, world: int) -> Tensor:
        """Dense attention (merged across ranks) over the slots this method keeps: the others' positions are -1 to
        the mask, which no query sees."""
        last = mask.q_pos.max()
        kept = (mask.kv_pos < self.sink) | (mask.kv_pos > last - self.recent)
        narrowed = PositionMask(mask.q_pos, torch.where(kept, mask.kv_pos, -1), mask.window)
        return super().attend(q, kv, narrowed, group, world)
