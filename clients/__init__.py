"""Client side of Switchboard: a thin Python client over the generated stubs, and examples.

The generated modules live in the ``switchboard.v1`` package (``clients/python``); other
languages generate their own from ``protos/``.
"""

from clients.client import SwitchboardClient

__all__ = ["SwitchboardClient"]
