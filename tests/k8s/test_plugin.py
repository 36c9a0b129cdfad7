"""The device plugin against the kubelet stand-in, on a fake host."""

from __future__ import annotations

import os
import shutil
import socket
import time

import grpc
import pytest

from pyvfio.k8s.plugin import socket_name
from pyvfio.testing.fakesysfs import FakeSysfs
from pyvfio.testing.kubelet import Kubelet

from .conftest import AUDIO, EDU, EDU_A, EDU_B, EDU_HOST, GPU

EDU_RES = "pyvfio.io/edu"
GPU_RES = "pyvfio.io/gpu"


def _registered(k: Kubelet, *resources: str) -> bool:
    return all(r in k.plugins and k.plugins[r].updates > 0 for r in resources)


def test_registers_each_resource_and_lists_one_device_per_iommu_group(kubelet, start_plugin):
    start_plugin()
    kubelet.wait_for(lambda k: _registered(k, EDU_RES, GPU_RES))
    assert sorted(kubelet.registrations) == [
        (EDU_RES, socket_name(EDU_RES)), (GPU_RES, socket_name(GPU_RES))]
    # EDU_A and EDU_B share group 7: one ID; EDU_HOST has no driver: Unhealthy.
    assert kubelet.devices(EDU_RES) == {EDU_A: "Healthy", EDU: "Healthy", EDU_HOST: "Unhealthy"}
    assert kubelet.devices(GPU_RES) == {GPU: "Healthy"}
    opts = kubelet.plugins[EDU_RES].options
    assert opts.get_preferred_allocation_available and not opts.pre_start_required


def test_topology_hints_come_from_numa_node(kubelet, start_plugin):
    start_plugin()
    kubelet.wait_for(lambda k: _registered(k, EDU_RES, GPU_RES))
    gpu = kubelet.plugins[GPU_RES].devices[GPU]
    assert [n.ID for n in gpu.topology.nodes] == [1]
    edu = kubelet.plugins[EDU_RES].devices[EDU]
    assert [n.ID for n in edu.topology.nodes] == [0]
    # numa_node -1 (no NUMA information): no topology at all.
    assert not kubelet.plugins[EDU_RES].devices[EDU_A].HasField("topology")


def test_reregisters_after_kubelet_restart(kubelet, start_plugin, plugin_dir):
    start_plugin()
    kubelet.wait_for(lambda k: _registered(k, EDU_RES, GPU_RES))
    first = len(kubelet.registrations)
    path = os.path.join(plugin_dir, socket_name(EDU_RES))
    st = os.stat(path)
    before = (st.st_ino, st.st_ctime_ns)
    kubelet.restart()  # wipes the directory (the plugin sockets too), new kubelet.sock
    kubelet.wait_for(lambda k: _registered(k, EDU_RES, GPU_RES), timeout=20)
    assert len(kubelet.registrations) == first + 2
    assert all(p.registrations == 1 for p in kubelet.plugins.values())  # a new kubelet
    st = os.stat(path)
    assert (st.st_ino, st.st_ctime_ns) != before  # a socket served anew
    assert kubelet.devices(EDU_RES)[EDU] == "Healthy"
    # The restarted stand-in still gets allocations through the new socket.
    reply = kubelet.allocate(EDU_RES, [EDU])
    assert reply.envs["PCI_RESOURCE_PYVFIO_IO_EDU"] == EDU


def test_registers_once_kubelet_appears(plugin_dir, start_plugin):
    start_plugin()  # no kubelet.sock yet: the plugin waits
    with Kubelet(plugin_dir) as late:
        late.wait_for(lambda k: _registered(k, EDU_RES, GPU_RES), timeout=20)


def test_sibling_on_a_host_driver_makes_the_group_unhealthy(kubelet, start_plugin,
                                                             fake: FakeSysfs, caplog):
    caplog.set_level("INFO", logger="pyvfio.k8s")
    start_plugin()
    kubelet.wait_for(lambda k: k.devices(GPU_RES).get(GPU) == "Healthy")
    # The GPU's audio function (not selected itself) goes back to its host driver.
    fake.write(fake.p("sys/bus/pci/drivers/vfio-pci/unbind"), AUDIO)
    fake.write(fake.p("sys/bus/pci/drivers/snd_hda_intel/bind"), AUDIO)
    kubelet.wait_for(lambda k: k.devices(GPU_RES).get(GPU) == "Unhealthy")
    lines = [r.getMessage() for r in caplog.records if "Healthy -> Unhealthy" in r.getMessage()]
    assert any(AUDIO in line and "snd_hda_intel" in line for line in lines), lines
    with pytest.raises(grpc.RpcError) as err:
        kubelet.allocate(GPU_RES, [GPU])
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert AUDIO in err.value.details() and "snd_hda_intel" in err.value.details()
    # And back: healthy again once the sibling is on vfio-pci.
    fake.write(fake.p("sys/bus/pci/drivers/snd_hda_intel/unbind"), AUDIO)
    fake.write(fake.p(f"sys/bus/pci/devices/{AUDIO}/driver_override"), "vfio-pci")
    fake.write(fake.p("sys/bus/pci/drivers_probe"), AUDIO)
    kubelet.wait_for(lambda k: k.devices(GPU_RES).get(GPU) == "Healthy")


def test_device_held_by_another_process_is_unhealthy(kubelet, start_plugin, fake: FakeSysfs):
    start_plugin()
    kubelet.wait_for(lambda k: k.devices(EDU_RES).get(EDU) == "Healthy")
    fake.add_process(4242, "qemu-system-x86", ["/dev/vfio/vfio", "/dev/vfio/31"])
    kubelet.wait_for(lambda k: k.devices(EDU_RES).get(EDU) == "Unhealthy")


def test_held_by_the_pod_it_was_allocated_to_stays_healthy(kubelet, start_plugin,
                                                           fake: FakeSysfs):
    daemon = start_plugin()
    kubelet.wait_for(lambda k: k.devices(EDU_RES).get(EDU) == "Healthy")
    kubelet.allocate(EDU_RES, [EDU])
    fake.add_process(4242, "qemu-system-x86", ["/dev/vfio/vfio", "/dev/vfio/31"])
    daemon.rescan("test")
    assert daemon.inventory.allocations == {EDU: "held"}
    time.sleep(0.5)  # several health intervals (0.1 s) pass: no Unhealthy
    assert kubelet.devices(EDU_RES)[EDU] == "Healthy"
    # The pod ends (the holder goes): the allocation is forgotten, and a new
    # holder outside Kubernetes makes it Unhealthy again.
    shutil.rmtree(fake.p("proc/4242"))
    kubelet.wait_for(lambda k: not daemon.inventory.allocations)
    fake.add_process(4343, "qemu-system-x86", ["/dev/vfio/vfio", "/dev/vfio/31"])
    kubelet.wait_for(lambda k: k.devices(EDU_RES).get(EDU) == "Unhealthy")


def test_whole_group_allocation_legacy(kubelet, start_plugin):
    start_plugin()
    kubelet.wait_for(lambda k: _registered(k, EDU_RES))
    reply = kubelet.allocate(EDU_RES, [EDU_A])
    # One ID, the whole group: both edus of group 7, through the group node.
    assert reply.envs["PCI_RESOURCE_PYVFIO_IO_EDU"] == f"{EDU_A},{EDU_B}"
    assert [(d.host_path, d.container_path, d.permissions) for d in reply.devices] == [
        ("/dev/vfio/vfio", "/dev/vfio/vfio", "rw"), ("/dev/vfio/7", "/dev/vfio/7", "rw")]
    two = kubelet.allocate(EDU_RES, [EDU_A, EDU])
    assert two.envs["PCI_RESOURCE_PYVFIO_IO_EDU"] == f"{EDU_A},{EDU_B},{EDU}"
    assert [d.host_path for d in two.devices] == ["/dev/vfio/vfio", "/dev/vfio/7", "/dev/vfio/31"]


def test_the_second_function_of_a_group_is_never_an_id(kubelet, start_plugin):
    start_plugin()
    kubelet.wait_for(lambda k: _registered(k, EDU_RES))
    assert EDU_B not in kubelet.devices(EDU_RES)
    with pytest.raises(grpc.RpcError) as err:
        kubelet.allocate(EDU_RES, [EDU_B])
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert EDU_B in err.value.details()


def test_unhealthy_device_is_refused_with_the_reason(kubelet, start_plugin):
    start_plugin()
    kubelet.wait_for(lambda k: _registered(k, EDU_RES))
    with pytest.raises(grpc.RpcError) as err:
        kubelet.allocate(EDU_RES, [EDU_HOST])
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert EDU_HOST in err.value.details()
    # kubelet itself would not pick it: admit takes only healthy devices.
    kubelet.admit(EDU_RES, 2)
    with pytest.raises(LookupError):
        kubelet.admit(EDU_RES, 3)


def test_iommufd_allocation_gives_cdevs_and_dev_iommu(kubelet, start_plugin, fake: FakeSysfs):
    with open(fake.p("dev/iommu"), "w"):
        pass
    start_plugin()
    kubelet.wait_for(lambda k: _registered(k, EDU_RES))
    reply = kubelet.allocate(EDU_RES, [EDU_A])
    cdevs = [f"/dev/vfio/devices/{fake.devices[a].vfio_cdev}" for a in (EDU_A, EDU_B)]
    assert [d.host_path for d in reply.devices] == ["/dev/iommu", *cdevs]
    assert reply.annotations == {"pyvfio.io/backend.pyvfio.io_edu": "iommufd"}


def test_backend_from_config(kubelet, start_plugin, fake: FakeSysfs):
    with open(fake.p("dev/iommu"), "w"):
        pass
    start_plugin('[resources."pyvfio.io/edu"]\nids = ["1234:11e8"]\nbackend = "legacy"\n')
    kubelet.wait_for(lambda k: _registered(k, EDU_RES))
    reply = kubelet.allocate(EDU_RES, [EDU])
    assert [d.host_path for d in reply.devices] == ["/dev/vfio/vfio", "/dev/vfio/31"]


def test_iommufd_backend_without_dev_iommu_is_unhealthy(kubelet, start_plugin):
    start_plugin('[resources."pyvfio.io/edu"]\nids = ["1234:11e8"]\nbackend = "iommufd"\n')
    kubelet.wait_for(lambda k: _registered(k, EDU_RES))
    assert set(kubelet.devices(EDU_RES).values()) == {"Unhealthy"}


def test_preferred_allocation_keeps_numa_locality(kubelet, start_plugin, fake: FakeSysfs):
    fake.add_device("0000:08:00.0", 0x1234, 0x11E8, 0x00FF00, group=50, driver="vfio-pci",
                    numa_node=1)
    fake.add_device("0000:09:00.0", 0x1234, 0x11E8, 0x00FF00, group=51, driver="vfio-pci",
                    numa_node=0)
    start_plugin()
    kubelet.wait_for(lambda k: _registered(k, EDU_RES))
    from pyvfio.k8s.v1beta1 import api_pb2 as api
    stub = kubelet.plugins[EDU_RES].stub
    reply = stub.GetPreferredAllocation(api.PreferredAllocationRequest(container_requests=[
        api.ContainerPreferredAllocationRequest(
            available_deviceIDs=[EDU_A, EDU, "0000:08:00.0", "0000:09:00.0"],
            must_include_deviceIDs=["0000:08:00.0"], allocation_size=2)]))
    # 08:00.0 is on node 1; nothing else is, so the next ID in order follows.
    assert list(reply.container_responses[0].deviceIDs) == ["0000:08:00.0", EDU_A]
    reply = stub.GetPreferredAllocation(api.PreferredAllocationRequest(container_requests=[
        api.ContainerPreferredAllocationRequest(
            available_deviceIDs=[EDU_A, EDU, "0000:08:00.0", "0000:09:00.0"],
            must_include_deviceIDs=[EDU], allocation_size=2)]))
    assert list(reply.container_responses[0].deviceIDs) == [EDU, "0000:09:00.0"]


def test_group_claimed_by_two_resources_goes_to_the_first(kubelet, start_plugin, caplog):
    caplog.set_level("INFO", logger="pyvfio.k8s")
    start_plugin(f'[resources."pyvfio.io/edu"]\naddresses = ["{EDU_A}"]\n'
                 f'[resources."pyvfio.io/other"]\naddresses = ["{EDU_B}", "{EDU}"]\n')
    kubelet.wait_for(lambda k: _registered(k, EDU_RES, "pyvfio.io/other"))
    assert list(kubelet.devices(EDU_RES)) == [EDU_A]
    assert list(kubelet.devices("pyvfio.io/other")) == [EDU]
    assert any(EDU_B in r.getMessage() and "belongs to pyvfio.io/edu" in r.getMessage()
               for r in caplog.records)


def test_stale_socket_is_replaced_and_a_live_one_refused(plugin_dir, fake, kubelet):
    from pyvfio.errors import UsageError
    from pyvfio.k8s.config import PluginConfig
    from pyvfio.k8s.plugin import DevicePluginDaemon

    path = os.path.join(plugin_dir, socket_name(EDU_RES))
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # a socket file nobody listens on
    config = PluginConfig.from_toml('[resources."pyvfio.io/edu"]\nids = ["1234:11e8"]\n')
    d = DevicePluginDaemon(config, root=fake.root, plugin_dir=plugin_dir)
    d.start()
    try:
        assert os.path.exists(path)
        other = DevicePluginDaemon(config, root=fake.root, plugin_dir=plugin_dir)
        with pytest.raises(UsageError, match="served by another process"):
            other.start()
    finally:
        d.shutdown()
    assert not os.path.exists(path)


def test_malformed_requests_get_an_error_status_and_the_server_goes_on(kubelet, start_plugin):
    from pyvfio.k8s.v1beta1 import api_pb2 as api

    start_plugin()
    kubelet.wait_for(lambda k: _registered(k, EDU_RES))
    stub = kubelet.plugins[EDU_RES].stub
    with pytest.raises(grpc.RpcError) as err:
        stub.Allocate(api.AllocateRequest(container_requests=[api.ContainerAllocateRequest()]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        kubelet.allocate(EDU_RES, ["not-an-address"])
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # Raw garbage on the wire: the gRPC layer answers, the plugin goes on.
    channel = kubelet.plugins[EDU_RES].channel
    garbage = channel.unary_unary("/v1beta1.DevicePlugin/Allocate",
                                  request_serializer=lambda b: b,
                                  response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError):
        garbage(b"\xff\xff\xff\xff", timeout=10)
    assert stub.PreStartContainer(api.PreStartContainerRequest(devices_ids=[EDU])) == \
        api.PreStartContainerResponse()
    assert kubelet.allocate(EDU_RES, [EDU]).envs["PCI_RESOURCE_PYVFIO_IO_EDU"] == EDU


def test_allocate_rediagnoses_and_publishes_before_the_next_health_pass(kubelet, start_plugin,
                                                                         fake: FakeSysfs):
    start_plugin('[plugin]\nhealth_interval = 3600\n'
                 '[resources."pyvfio.io/gpu"]\nids = ["10de:1b80"]\n')
    kubelet.wait_for(lambda k: k.devices(GPU_RES).get(GPU) == "Healthy")
    fake.write(fake.p("sys/bus/pci/drivers/vfio-pci/unbind"), AUDIO)
    fake.write(fake.p("sys/bus/pci/drivers/snd_hda_intel/bind"), AUDIO)
    assert kubelet.devices(GPU_RES)[GPU] == "Healthy"  # no health pass for an hour
    with pytest.raises(grpc.RpcError) as err:
        kubelet.allocate(GPU_RES, [GPU])
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # ...and kubelet hears of it at once, as the API asks of a failed Allocate.
    kubelet.wait_for(lambda k: k.devices(GPU_RES).get(GPU) == "Unhealthy", timeout=5)
