"""The error tree of :mod:`server.deploy`: :class:`DeployError` for anything that stops a
deployment from starting, running or stopping, and its two refusals that a user fixes
before retrying, :class:`MissingFile` and :class:`PortInUse`.
"""

from __future__ import annotations


class DeployError(RuntimeError):
    """A deployment could not start, run or stop; the message says which part and why."""


class MissingFile(DeployError):
    """A certificate, key or other file the deployment needs is not there."""


class PortInUse(DeployError):
    """A port the deployment must listen on is taken by another process."""
