"""The access log's records and its logger (arr/accesslog.py)."""

from __future__ import annotations

import json
import logging

from arr import accesslog


def test_a_handed_off_request_claims_no_status():
    record = accesslog.request_record(
        client=("10.0.0.2", 4000), method="GET", target="/x", host="h", user_agent="curl/8",
        number=3, decision="handoff", upstream="t1", status=None, handed_off=True, request_body_bytes=0,
        response_bytes=None, duration_s=0.0012, now=0.0)
    assert record["status"] is None and record["handed_off"] is True and record["response_bytes"] is None
    assert record["time"] == "1970-01-01T00:00:00.000Z" and record["duration_ms"] == 1.2
    assert json.loads(accesslog.encode(record)) == record


def test_request_ids_are_unique():
    ids = {accesslog.request_id() for _ in range(10_000)}
    assert len(ids) == 10_000


def test_connection_end_names_both_directions():
    record = accesslog.connection_end(client=("10.0.0.2", 4000), target=("10.0.1.11", 80), how="fin",
                                      duration_s=2.5, packets_in=10, bytes_in=500, packets_out=700,
                                      bytes_out=1_000_000, now=0.0)
    assert record["type"] == "connection_end" and record["target_bytes"] == 1_000_000
    assert record["client_bytes"] == 500 and record["duration_ms"] == 2500.0


def test_the_logger_is_its_own_and_writes_plain_json_lines(tmp_path, caplog):
    path = tmp_path / "access.log"
    try:
        accesslog.configure(str(path))
        logging.getLogger("arr").setLevel(logging.ERROR)  # the application's level does not apply
        accesslog.emit({"type": "request", "status": 200})
        assert json.loads(path.read_text()) == {"type": "request", "status": 200}
        assert accesslog.enabled()
        assert not [r for r in caplog.records if r.name == accesslog.ACCESS_LOGGER]  # not propagated
        accesslog.configure(None)
        assert not accesslog.enabled()  # hot paths build no record then (handoff/lifecycle.py)
        accesslog.emit({"type": "request", "status": 201})
        assert path.read_text().count("\n") == 1
    finally:
        logging.getLogger("arr").setLevel(logging.NOTSET)
        logger = logging.getLogger(accesslog.ACCESS_LOGGER)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.disabled, logger.propagate = False, True
