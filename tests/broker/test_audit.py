"""The decision log's line format is stable and parseable."""

from __future__ import annotations

import datetime as dt
import io
import re

from pyvfio.broker.audit import AuditLog, format_record, parse_record
from pyvfio.broker.wire import PeerCredentials


def test_format_is_stable() -> None:
    when = dt.datetime(2025, 1, 31, 10, 0, 0, 123456, tzinfo=dt.UTC)
    line = format_record({"reason": 'no rule "x"', "event": "open", "decision": "refused",
                          "device": "0000:00:03.0", "uid": 65534, "extra": ""}, when)
    assert line == ('2025-01-31T10:00:00.123Z pyvfio-broker event=open decision=refused uid=65534 '
                    'device=0000:00:03.0 reason="no rule \\"x\\"" extra=""')


def test_round_trip_and_peer_fields(tmp_path) -> None:
    stream = io.StringIO()
    log = AuditLog(str(tmp_path / "log"), stream)
    peer = PeerCredentials(pid=42, uid=0, gid=0)
    problems = [{"kind": "not-viable", "device": "0000:02:02.0", "driver": "e1000"}]
    line = log.record("open", "refused", peer, device="0000:02:01.0", reason="not viable\nsecond",
                      problems=problems)
    log.close()
    assert stream.getvalue() == line + "\n"
    assert (tmp_path / "log").read_text() == line + "\n"
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z pyvfio-broker event=open ", line)
    fields = parse_record(line)
    assert fields["user"] == "root" and fields["pid"] == "42" and fields["decision"] == "refused"
    assert fields["reason"] == "not viable\nsecond"
    import json
    assert json.loads(fields["problems"]) == problems
