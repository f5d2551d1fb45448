"""A method is one object with a drafter side (a proposer) and a coordinator side (a round).

The registry is ``hsd_serve.engine.methods.METHODS`` (name -> ``Method``): a new method is one
module in this package plus one line there.

Drafter side.  ``Method.proposer(worker)`` builds the method's proposer for one drafter worker,
once; it owns the pair's tables (TLI's intersection, SLRS's trie and cost budget).
``draft(st, k, position, attempt)`` is a generator — the *draft protocol*::

    context = gen.send(None)      # drafter ids it needs the next-token logits after
    context = gen.send(logits)    # logits: [V_draft], the row after that context
    ...                           # until StopIteration(value=Draft)

A proposer never runs the model: the worker drives one request alone or many in lockstep, one
batched forward per step (``DrafterWorker.draft_batch``), so batching cannot change a draft.
``st`` is the request's ``DrafterState``: ``st.context()`` is what the drafter holds of the
committed text (the target's ids when ``uses_ids``, else its own tokenization of the bytes).
Sampled drafts draw from ``(seed, position, DRAFT, salt=attempt)`` (``core.sampling``:
"Independence").

Coordinator side.  ``speculate(run, k, position)`` is the speculative part of one round of a
``RequestRun``: it returns a ``Round`` (the tokens the target emitted and the round's counts), or
``None`` when there is nothing to verify (the run then takes one plain target step).  The
default is draft → ``bridge`` (drafter output → target candidates, and which verification rule)
→ verify; SLRS overrides it (the target's row first, then the drafter decides).  With drafting
ahead (``RunPolicy.overlap``) the draft may be one the drafter made while the target verified the
previous round (``RequestRun.ready_draft``/``draft_ahead``); with none usable the round is the
target's plain step while the drafter drafts ahead from the committed tokens
(``RequestRun.plain_while_drafting``, ``RunPolicy.overlap_miss``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Optional

import torch

from hsd_serve.engine.protocol import SPECULATIVE, Draft, DrafterFailed

if TYPE_CHECKING:  # pragma: no cover
    from hsd_serve.engine.run import RequestRun


@dataclass
class Round:
    """The outcome of one round's speculation."""

    tokens: list[int]  # emitted by the target (accepted drafts, then its own choice)
    drafted: int  # candidates the target checked
    accepted: int
    fallback: bool = False  # ran target-only although the method speculates


class Method:
    name: ClassVar[str]
    needs_drafter: ClassVar[bool] = True
    rule: ClassVar[str] = SPECULATIVE  # how the target verifies this method's candidates
    # a draft made ahead may carry branches (``RunPolicy.overlap_branches``, drafted by
    # ``DrafterWorker._branch_from`` with this method's proposer): its drafts are greedy with no
    # rows (SLEM)
    branches_ahead: ClassVar[bool] = False

    def uses_ids(self, same_vocab: bool) -> bool:
        """Whether the drafter works on the committed target ids (else on the committed bytes)."""
        return False

    def check_pair(self, same_vocab: bool) -> None:
        """Raise ValueError when this drafter/target pair cannot run the method."""

    def drafts_argmax(self, params) -> bool:
        """Whether every token this method drafts for ``params`` is an argmax of the drafter's
        (restricted) row and nothing else of the row is sent: a drafter that returns tokens
        only (vLLM's) can draft it."""
        return False

    def proposer(self, worker):
        """This method's drafter side for ``worker`` (a ``DrafterWorker``)."""
        raise ValueError(f"method {self.name!r} does not use a drafter")

    def bridge(self, draft: Draft, run: "RequestRun",
               k: int) -> tuple[str, list[int], Optional[torch.Tensor]]:
        """(rule, candidate target ids, proposal rows) for what the drafter sent."""
        return self.rule, list(draft.target_ids), draft.proposals

    async def speculate(self, run: "RequestRun", k: int, position: int) -> Optional[Round]:
        draft = await run.ready_draft(k)
        if draft is None:
            if run.plain_on_miss():  # overlap: the target never waits for a draft
                return await run.plain_while_drafting(k, position)
            draft = await run.draft(k, position)
        try:
            rule, cands, proposals = self.bridge(draft, run, k)
        except Exception as exc:  # noqa: BLE001 - odd drafted text costs a round, not the request
            raise DrafterFailed(exc) from exc
        cands, proposals = run.fit(cands, proposals)
        if not cands:
            return None
        run.draft_ahead(k, position, cands)  # overlap: the next draft while the target verifies
        v = await run.verify(position, cands, rule, proposals)
        return Round(v.tokens, len(cands), v.accepted)
