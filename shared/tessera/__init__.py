"""Tessera: federated learning with DP-SGD, dropout-tolerant secure aggregation and secure FedAvg.

Library layers (dependencies point down): the pure core (:mod:`tessera.secagg`, :mod:`tessera.quantize`,
:mod:`tessera.fedavg`, :mod:`tessera.dp`, :mod:`tessera.protocol`), adapters (:mod:`tessera.transport`,
:mod:`tessera.storage`, :mod:`tessera.data`, :mod:`tessera.models`), and the services
(:mod:`tessera.curator`, :mod:`tessera.participant`).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tessera-fl")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
