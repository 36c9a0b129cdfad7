"""A Kubernetes device plugin for VFIO devices (``pyvfio k8s-device-plugin``).

- :mod:`pyvfio.k8s.config`: the config file (resources and their selectors);
- :mod:`pyvfio.k8s.inventory`: one advertised device per IOMMU group, its
  health from the host diagnosis, what Allocate hands out;
- :mod:`pyvfio.k8s.plugin`: the gRPC servers and kubelet registration (needs
  the ``k8s`` extra: grpcio and protobuf);
- :mod:`pyvfio.k8s.v1beta1`: the pinned kubelet API (``api.proto``) and its
  generated modules.

See docs/kubernetes.md.
"""
