import json
import logging

from common.logs import JsonFormatter
from tests.test_verifier_fake import make_verifier, open_msg


def test_session_logs_are_json_with_session_id_and_no_prompt(caplog):
    caplog.set_level(logging.INFO, logger="sqs.cloud")
    v = make_verifier()
    s = v.open(open_msg(0, 1.0, context=(3, 1, 4))[0])
    records = [r for r in caplog.records if r.name == "sqs.cloud"]
    assert records, "opening a session logs at INFO"
    line = json.loads(JsonFormatter().format(records[-1]))
    assert line["level"] == "INFO" and s.id in line["msg"] and "3, 1, 4" not in line["msg"]
