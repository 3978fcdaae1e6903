"""Sensorium: how close is a language model's picture of a word to people's, and does fine-tuning close the gap?

``from sensorium import Client`` gives typed access to the three services (see ``sensorium.client``);
the domain modules (``sensorium.rsa``, ``sensorium.stats``, ``sensorium.norms``, ...) run in-process.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sensorium.client import Client

__all__ = ["Client"]


def __getattr__(name: str) -> Any:
    # grpc and the generated stubs load only when the client is asked for
    if name == "Client":
        from sensorium.client import Client

        return Client
    raise AttributeError(f"module 'sensorium' has no attribute {name!r}")
