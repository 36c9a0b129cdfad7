"""Privilege separation: the fd broker and device handoff (docs/broker.md).

- :mod:`pyvfio.broker.server` — the root daemon (``pyvfio broker``).
- :mod:`pyvfio.broker.client` — :func:`open_device`, :class:`BrokerSession`.
- :mod:`pyvfio.broker.handoff` — :func:`send_devices`, :func:`receive_devices`.
- :mod:`pyvfio.broker.policy`, :mod:`pyvfio.broker.wire`, :mod:`pyvfio.broker.audit` —
  the policy file, the wire format, the decision log.
"""

from pyvfio.broker.client import BrokerSession, open_device
from pyvfio.broker.handoff import receive_devices, send_devices

__all__ = ["BrokerSession", "open_device", "receive_devices", "send_devices"]
