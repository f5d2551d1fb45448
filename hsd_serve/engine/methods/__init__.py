"""One short module per drafting method: how the drafter proposes, given its synced state.

Each ``draft_*`` is a generator: it yields the drafter context it needs the next logits for and
receives them, and returns the ``Draft``.  The worker drives one request alone or many requests in
lockstep, one batched forward per step (``DrafterWorker.draft_batch``).

AR needs no drafter (the coordinator asks the target for its own choice).  SLEM also has a
coordinator-side bridge (``slem.candidates``) and SLRS finishes on the drafter after the target
sent its row (``slrs.slrs_step``).
"""

from hsd_serve.engine.methods.sd import draft_sd
from hsd_serve.engine.methods.slem import draft_slem
from hsd_serve.engine.methods.tli import draft_tli

DRAFT_FUNCTIONS = {"sd": draft_sd, "slem": draft_slem, "tli": draft_tli}

__all__ = ["DRAFT_FUNCTIONS", "draft_sd", "draft_slem", "draft_tli"]
