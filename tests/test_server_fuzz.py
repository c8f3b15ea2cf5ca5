"""schemathesis against the server's own ``/openapi.json``, positive and negative data, bounded:
no 5xx, every status, content type, header and body as the document declares, and every request
that violates the schema rejected.

Left out on purpose: schemathesis' ``positive_data_acceptance`` check, which expects every
schema-valid request to succeed. Some schema-valid requests are refused by design with a 400
(a data URL whose bytes are not an image, a prompt longer than the context), which a JSON schema
cannot express.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import Server


@pytest.fixture(scope="module")
def server(tiny_one):
    # a short context keeps each fuzzed answer short (the coverage phase sends ~1500 requests)
    s = Server(tiny_one.bundle, "--ctx-size", "48", "--metrics", "--max-body-mb", "1")
    yield s
    s.close()


def test_schemathesis_finds_nothing(server):
    st = Path(sys.executable).with_name("schemathesis")
    r = subprocess.run([str(st), "run", server.url + "/openapi.json", "-H", f"Authorization: Bearer {server.api_key}",
                        "--checks", "all", "--exclude-checks", "positive_data_acceptance", "--mode", "all",
                        "--max-examples", "20", "--generation-deterministic", "--request-timeout", "60", "--workers", "1"],
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stdout[-6000:]
    assert " passed" in r.stdout and "No issues found" in r.stdout, r.stdout[-3000:]
    assert "Traceback" not in server.output()
