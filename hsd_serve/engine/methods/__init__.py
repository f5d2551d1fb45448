"""The methods, one module each; ``METHODS`` is the registry (see ``base`` for the protocol).

A new method is one module here (a ``Method`` subclass and its proposer) plus one line below.
"""

from hsd_serve.engine.methods.ar import AR
from hsd_serve.engine.methods.base import Method, Round
from hsd_serve.engine.methods.sd import SD
from hsd_serve.engine.methods.slem import SLEM
from hsd_serve.engine.methods.slrs import SLRS
from hsd_serve.engine.methods.tli import TLI

METHODS: dict[str, Method] = {m.name: m for m in (AR(), SD(), SLEM(), TLI(), SLRS())}

__all__ = ["METHODS", "Method", "Round"]
