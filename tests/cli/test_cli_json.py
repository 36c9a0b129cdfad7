"""docs/cli-json.md is exact: each command's documented JSON has the keys the
command prints, every command with --json is in it, and a field has one
form everywhere (vfio_cdev in ls and check)."""

from __future__ import annotations

import io
import json
import re
import threading
from pathlib import Path
from typing import Any

import pytest

from pyvfio.broker.audit import AuditLog
from pyvfio.broker.policy import Policy
from pyvfio.broker.server import Broker
from pyvfio.cli import build_parser, main
from pyvfio.testing.fakesysfs import FakeSysfs

DOC = Path(__file__).resolve().parents[2] / "docs" / "cli-json.md"
EDU = "0000:00:03.0"
NIC = "0000:00:04.0"


def sections() -> dict[str, list[Any]]:
    """``## heading`` -> the JSON blocks under it, parsed."""
    out: dict[str, list[Any]] = {}
    for part in re.split(r"^## ", DOC.read_text(), flags=re.M)[1:]:
        title, _, body = part.partition("\n")
        out[title.strip()] = [json.loads(b) for b in re.findall(r"```json\n(.*?)```", body, re.S)]
    return out


def keys(value: Any, prefix: str = "") -> set[str]:
    """Every key path in ``value`` (lists: their first element)."""
    found: set[str] = set()
    if isinstance(value, list):
        return keys(value[0], prefix + "[]") if value else found
    if isinstance(value, dict):
        for k, v in value.items():
            found.add(prefix + "." + k)
            found |= keys(v, prefix + "." + k)
    return found


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any]:
    code = main(list(argv))
    return code, json.loads(capsys.readouterr().out)


@pytest.fixture
def host(tmp_path: Path):
    fake = FakeSysfs(tmp_path / "root", noiommu=False, cdev=True)
    fake.add_standard_drivers()
    fake.add_device(EDU, 0x1234, 0x11E8, 0x00FF00, group=3, revision=0x10)
    fake.add_device(NIC, 0x8086, 0x100E, 0x020000, group=4, driver="e1000")
    with fake:
        yield fake


def test_every_json_command_is_documented() -> None:
    (action,) = [a for a in build_parser()._actions if a.dest == "command"]
    text = DOC.read_text()
    table = text.split("## Errors")[0]
    for name, parser in action.choices.items():
        takes_json = any("--json" in a.option_strings for a in parser._actions)
        if takes_json:
            assert f"`pyvfio {name}" in table, f"{name} takes --json but is not in the table"
        else:
            assert f"`{name}`" in table.split("|---|---|")[1], f"{name}: say it takes no --json"


def test_error_object_is_as_documented(host: FakeSysfs, capsys) -> None:
    (doc,) = sections()["Errors"]
    code, got = run(capsys, "--root", host.root, "check", "09:00.0", "--json")
    assert code == 2 and got["error"]["kind"] == doc["error"]["kind"]
    assert got["error"]["message"] == doc["error"]["message"].replace("/sys", host.root + "/sys")


def test_ls_and_check_schemas(host: FakeSysfs, capsys, tmp_path: Path) -> None:
    docs = sections()
    code, out = run(capsys, "--root", host.root, "bind", EDU, "--json",
                    "--state-dir", str(tmp_path / "st"))
    assert code == 0
    (bind_doc,) = docs["pyvfio bind and pyvfio restore"]
    assert keys(out) >= keys(bind_doc)
    _, ls = run(capsys, "--root", host.root, "ls", EDU, "--json")
    (ls_doc,) = docs["pyvfio ls"]
    assert keys(ls[0]) == keys(ls_doc) | {".vendor_name", ".device_name", ".subsystem_name"}
    code, check = run(capsys, "--root", host.root, "check", EDU, "--json")
    (check_doc,) = docs["pyvfio check"]
    assert keys(check[0]) | {".in_use[].pid", ".in_use[].comm", ".in_use[].path",
                             ".problems[].device", ".problems[].driver", ".problems[].reason",
                             ".problems[].fix", ".problems[].kind",
                             ".problems[].evidence"} == keys(check_doc)
    # One form per field: the cdev's name in both, its node's path in both.
    assert ls[0]["vfio_cdev"] == check[0]["vfio_cdev"] == "vfio0"
    assert ls[0]["vfio_cdev_path"] == check[0]["vfio_cdev_path"] == "/dev/vfio/devices/vfio0"
    _, groups = run(capsys, "--root", host.root, "groups", "--json")
    (groups_doc,) = docs["pyvfio groups"]
    assert keys(groups[0]) | {".reserved_regions[].start", ".reserved_regions[].end",
                              ".reserved_regions[].type"} >= keys(groups_doc)


def test_info_and_edu_schemas(edu_socket: str, capsys) -> None:
    from pyvfio.drivers import edu

    docs = sections()
    _, info = run(capsys, "info", "--vfio-user", edu_socket, "--json")
    (info_doc,) = docs["pyvfio info"]
    # (edu over vfio-user offers no mmap areas: the documented kernel BAR0 does)
    assert keys(info) >= keys(info_doc) - {".regions[].mmap_areas[].offset",
                                           ".regions[].mmap_areas[].size"}
    assert edu.main(["--vfio-user", edu_socket, "--json", "--interrupts", ""]) == 0
    (edu_doc,) = docs["python -m pyvfio.drivers.edu"]
    assert keys(json.loads(capsys.readouterr().out)) == keys(edu_doc)


def test_broker_and_serve_schemas(host: FakeSysfs, capsys, sockdir: Path) -> None:
    docs = sections()
    policy = sockdir / "policy.toml"
    policy.write_text('[[rule]]\nname = "edu"\nusers = ["root"]\nids = ["1234:11e8"]\n')
    policy.chmod(0o644)
    _, checked = run(capsys, "broker", "--socket", str(sockdir / "b.sock"), "--policy",
                     str(policy), "--check", "--json")
    (check_doc,) = docs["pyvfio broker --check"]
    assert keys(checked) == keys(check_doc)
    path = str(sockdir / "b.sock")
    broker = Broker(path, Policy.load(policy), root=host.root, audit=AuditLog(None, io.StringIO()))
    broker.listen()
    thread = threading.Thread(target=broker.serve_forever, daemon=True)
    thread.start()
    try:
        _, allowed = run(capsys, "broker-open", "--socket", path, "--list", "--json")
    finally:
        broker.stop()
        thread.join(10)
    (list_doc,) = docs["pyvfio broker-open"]
    assert [d["device"] for d in allowed] == [EDU] and keys(allowed) == keys(list_doc)
    _, models = run(capsys, "serve", "--list", "--json")
    (serve_doc,) = docs["pyvfio serve --list"]
    assert keys(models) == keys(serve_doc) and models[0]["model"] == "edu"


def test_json_only_where_it_means_something(capsys, sockdir: Path) -> None:
    assert main(["serve", "edu", "--socket", str(sockdir / "x.sock"), "--json"]) == 2
    assert json.loads(capsys.readouterr().out)["error"]["message"] == (
        "--json goes with --list (a running server logs to stderr)")
