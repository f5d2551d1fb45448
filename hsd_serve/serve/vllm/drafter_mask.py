"""``AllowedIdsOnly``: a vLLM logits processor that keeps a drafter's masked requests inside a
fixed set of ids (TLI: the vocabulary intersection; SD: the target's ids).

vLLM's own ``allowed_token_ids`` takes the list with every request (validated in Python, copied,
sent to the worker and turned into a mask per request); a drafter opens a vLLM request per draft
call, so with the ~20k ids of an intersection that cost is paid every round.  This processor loads
the mask once in the engine's process (the file named by ``$HSD_VLLM_DRAFTER_MASK``, written by
``VllmDraftModel.start``) and applies it to the rows of the requests that ask for it
(``SamplingParams.extra_args["hsd_masked"]``) in one ``masked_fill`` per step.
"""

from __future__ import annotations

import os

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from hsd_serve.serve.vllm.drafter import MASK_ENV, MASKED


class AllowedIdsOnly(LogitsProcessor):
    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.device = device
        path = os.environ.get(MASK_ENV)
        self.blocked = None  # [logit size] bool: ids a masked request may not draft
        if path:
            self.blocked = ~torch.load(path, map_location="cpu").to(device)
        self.rows: dict[int, bool] = {}  # batch index -> masked
        self.index = torch.empty(0, dtype=torch.long, device=device)

    def is_argmax_invariant(self) -> bool:
        return False  # it changes the argmax: that is what it is for

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        def masked(params, _prompt, _output):
            return True if (params.extra_args or {}).get(MASKED) else None

        if process_dict_updates(self.rows, batch_update, masked):
            self.index = torch.tensor(sorted(self.rows), dtype=torch.long, device=self.device)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.rows and self.blocked is not None:
            width = min(logits.shape[-1], self.blocked.numel())
            rows = logits[self.index, :width]
            logits[self.index, :width] = rows.masked_fill(self.blocked[:width], float("-inf"))
        return logits
