"""AR: the target alone, one token per round (the reference for every test and benchmark)."""

from hsd_serve.engine.methods.base import Method


class AR(Method):
    name = "ar"
    needs_drafter = False

    async def speculate(self, run, k, position):
        return None
