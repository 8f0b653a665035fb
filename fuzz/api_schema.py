#!/usr/bin/env python3
"""A long schemathesis run over the whole OpenAPI document, against the real daemon.

    python3 fuzz/api_schema.py                  # at most 300 cases per operation
    python3 fuzz/api_schema.py -n 2000 --seed 7 # more, another seed

It starts `tiktokguard serve` in the background on free loopback ports (its config, state and
one admin token in a temporary folder; the daemon lives at most --life seconds whatever
happens), runs `st run` against its /openapi.json with that token, stops the daemon and prints
schemathesis' summary: the number of test cases tried and every failure. It exits with
schemathesis' status. tests/test_api_schema.py runs a short version of this in the suite.

The check that a valid body is accepted (positive_data_acceptance) is left out: JSON Schema
cannot say that a device's CIDR must not have host bits set or be wider than /16, or that an
address may belong to one device only, so such bodies are refused on purpose (400, 409).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fakes import free_port

CHECKS = ",".join(["not_a_server_error", "status_code_conformance", "content_type_conformance",
                   "response_headers_conformance", "response_schema_conformance",
                   "negative_data_rejection", "missing_required_header",
                   "unsupported_method", "ignored_auth"])


def wait_ready(url: str, proc: subprocess.Popen[bytes], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the daemon exited with {proc.returncode} before it was ready")
        with contextlib.suppress(OSError), \
                urllib.request.urlopen(url + "/readyz", timeout=1) as reply:
            if reply.status == 200:
                return
        time.sleep(0.2)
    raise SystemExit(f"the daemon was not ready within {seconds:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--max-examples", type=int, default=300,
                        help="at most this many test cases per API operation "
                             "(st run --max-examples; default 300)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--life", type=int, default=900,
                        help="the daemon is stopped after this many seconds (default 900)")
    parser.add_argument("--st", default=str(Path(sys.executable).with_name("st")),
                        help="the schemathesis command (default: beside this Python)")
    args = parser.parse_args()
    binary = Path(sys.executable).with_name("tiktokguard")
    token = secrets.token_urlsafe(24)
    http_port, dns_port = free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="tiktokguard-schema-") as folder:
        config = Path(folder) / "tiktokguard.toml"
        # The upstream is a closed loopback port: the API never needs an answer from it.
        config.write_text(
            f'[dns]\nlisten = ["127.0.0.1:{dns_port}"]\nupstreams = ["127.0.0.1:9"]\n'
            f'[http]\nlisten = "127.0.0.1:{http_port}"\n'
            f'tokens.fuzz = {{ role = "admin", sha256 = '
            f'"{hashlib.sha256(token.encode()).hexdigest()}" }}\n'
            f'[state]\ndir = "{Path(folder) / "state"}"\n')
        log = (Path(folder) / "daemon.log").open("wb")
        proc = subprocess.Popen(["timeout", "-k", "5", str(args.life), str(binary), "serve",
                                 "--config", str(config)], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{http_port}"
        try:
            wait_ready(url, proc, 30)
            st = subprocess.run(
                [args.st, "run", url + "/openapi.json", "--checks", CHECKS,
                 "--max-examples", str(args.max_examples), "--seed", str(args.seed),
                 "--header", f"Authorization: Bearer {token}", "--no-color",
                 "--request-timeout", "10", "--generation-database", "none"],
                cwd=folder, timeout=args.life, check=False)
            return st.returncode
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
            log.close()
            lines = (Path(folder) / "daemon.log").read_text().splitlines()
            errors = [i for i, line in enumerate(lines)
                      if '"level": "error"' in line or line.startswith("Traceback")]
            print(f"daemon: exit {proc.returncode}, {len(errors)} errors in its log")
            for i in errors[:5]:
                print("\n".join("  " + line[:300] for line in lines[i:i + 25]))


if __name__ == "__main__":
    sys.exit(main())
