"""The kubelet device plugin API v1beta1: ``api.proto`` (pinned; its header
names the upstream file and commit) and the modules ``scripts/gen-k8s-proto``
generates from it with grpcio-tools (``api_pb2``, ``api_pb2_grpc``)."""
