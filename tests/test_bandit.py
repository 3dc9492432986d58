"""bandit on every Python package of ours: no finding other than those listed, with their reason,
in bandit-accepted.yaml (issue 23 item 5). bandit is pinned in pyproject's test extra."""

from __future__ import annotations

import collections
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "edge", "cloud", "bench", "sqs_models", "linksim", "loadtest", "scripts")


def _bandit() -> list[str]:
    exe = shutil.which("bandit", path=str(Path(sys.executable).parent)) or shutil.which("bandit")
    if exe is None:
        pytest.fail("bandit is not installed: `make install` installs the test extra (pyproject.toml)")
    return [exe]


def test_every_bandit_finding_is_fixed_or_listed_with_its_reason():
    accepted = yaml.safe_load((ROOT / "bandit-accepted.yaml").read_text())
    for test_id, entry in accepted.items():
        assert len(entry.get("reason", "").split()) >= 5, f"{test_id}: say why it is safe"
    proc = subprocess.run([*_bandit(), "-q", "-r", *PACKAGES, "-f", "json"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    report = json.loads(proc.stdout)
    assert not report["errors"], report["errors"]
    found = collections.Counter((r["test_id"], r["filename"]) for r in report["results"])
    unlisted = []
    for (test_id, filename), n in sorted(found.items()):
        allowed = accepted.get(test_id, {}).get("files", {}).get(filename, 0)
        if n > allowed:
            lines = [f"{r['filename']}:{r['line_number']} {r['issue_text']}" for r in report["results"]
                     if (r["test_id"], r["filename"]) == (test_id, filename)]
            unlisted.append(f"{test_id} x{n} (listed {allowed}): " + "; ".join(lines))
    assert not unlisted, "bandit findings neither fixed nor listed in bandit-accepted.yaml:\n" + "\n".join(unlisted)
