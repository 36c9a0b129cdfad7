"""The pinned kubelet API: the committed modules are what grpcio-tools makes
of api.proto, and the wire names are kubelet's."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from pyvfio.k8s.v1beta1 import api_pb2

REPO = Path(__file__).resolve().parents[2]
PROTO = "pyvfio/k8s/v1beta1/api.proto"


def test_committed_modules_match_the_proto(tmp_path):
    protoc = pytest.importorskip("grpc_tools.protoc", reason="grpcio-tools (k8s-dev extra) "
                                 "is not installed")
    (tmp_path / PROTO).parent.mkdir(parents=True)
    shutil.copy(REPO / PROTO, tmp_path / PROTO)
    import importlib.resources

    include = str(importlib.resources.files("grpc_tools") / "_proto")
    rc = protoc.main(["protoc", f"-I{tmp_path}", f"-I{include}", f"--python_out={tmp_path}",
                      f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
                      str(tmp_path / PROTO)])
    assert rc == 0
    for name in ("api_pb2.py", "api_pb2.pyi", "api_pb2_grpc.py"):
        fresh = _semantic((tmp_path / "pyvfio/k8s/v1beta1" / name).read_text())
        committed = _semantic((REPO / "pyvfio/k8s/v1beta1" / name).read_text())
        assert fresh == committed, f"{name} is stale: run scripts/gen-k8s-proto"


def _semantic(text: str) -> str:
    """The generated text without the generator's version numbers (a newer
    grpcio-tools writes its own), keeping everything the proto decides: the
    serialized descriptor, the messages, the service stubs."""
    text = re.sub(r"GRPC_GENERATED_VERSION = '[^']*'", "GRPC_GENERATED_VERSION = ''", text)
    text = re.sub(r"# Protobuf Python Version: .*", "", text)
    return re.sub(r"ValidateProtobufRuntimeVersion\([^)]*\)", "ValidateProtobufRuntimeVersion()",
                  text)


def test_wire_names_are_kubelets():
    fd = api_pb2.DESCRIPTOR
    assert fd.package == "v1beta1"
    services = {s.name: [m.name for m in s.methods] for s in fd.services_by_name.values()}
    assert services == {
        "Registration": ["Register"],
        "DevicePlugin": ["GetDevicePluginOptions", "ListAndWatch", "GetPreferredAllocation",
                         "Allocate", "PreStartContainer"],
    }
    law = fd.services_by_name["DevicePlugin"].methods_by_name["ListAndWatch"]
    assert law.server_streaming and not law.client_streaming

    def fields(message: str) -> list[tuple[str, int]]:
        return [(f.name, f.number) for f in fd.message_types_by_name[message].fields]

    assert fields("RegisterRequest") == [("version", 1), ("endpoint", 2), ("resource_name", 3),
                                         ("options", 4)]
    assert fields("Device") == [("ID", 1), ("health", 2), ("topology", 3)]
    assert fields("ContainerAllocateResponse") == [("envs", 1), ("mounts", 2), ("devices", 3),
                                                   ("annotations", 4), ("cdi_devices", 5)]
    assert fields("DeviceSpec") == [("container_path", 1), ("host_path", 2), ("permissions", 3)]
    assert fields("ContainerPreferredAllocationRequest") == [
        ("available_deviceIDs", 1), ("must_include_deviceIDs", 2), ("allocation_size", 3)]
