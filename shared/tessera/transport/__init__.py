"""RabbitMQ transport: bytes in, bytes out (the protocol layer above encodes and decodes).

The only importer of pika in Tessera. Topology and permissions follow ``docs/topology.md``
(:mod:`tessera.transport.topology`); :mod:`tessera.transport.provision` creates them on a broker;
:class:`CuratorTransport` and :class:`ParticipantTransport` publish with confirms and receive with manual
acks on an I/O thread of their own (see :mod:`tessera.transport.endpoint` for the threading design).
"""

from tessera.transport.chunking import ReassemblyLimits
from tessera.transport.connection import (
    ConnectionSettings,
    ReconnectPolicy,
    TlsSettings,
    connection_parameters,
)
from tessera.transport.endpoint import (
    CuratorTransport,
    Delivery,
    Envelope,
    ParticipantTransport,
    Sent,
    TransportSettings,
)
from tessera.transport.errors import (
    ProvisioningError,
    PublishFailed,
    PublishRefused,
    TransportClosed,
    TransportError,
    TransportUnavailable,
)
from tessera.transport.provision import deprovision, generate_password, local_broker_problem, provision
from tessera.transport.topology import declare_topology

__all__ = [
    "ConnectionSettings",
    "CuratorTransport",
    "Delivery",
    "Envelope",
    "ParticipantTransport",
    "ProvisioningError",
    "PublishFailed",
    "PublishRefused",
    "ReassemblyLimits",
    "ReconnectPolicy",
    "Sent",
    "TlsSettings",
    "TransportClosed",
    "TransportError",
    "TransportSettings",
    "TransportUnavailable",
    "connection_parameters",
    "declare_topology",
    "deprovision",
    "generate_password",
    "local_broker_problem",
    "provision",
]
