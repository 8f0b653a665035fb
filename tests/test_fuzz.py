"""The fuzz target (fuzz/wire_fuzz.py) in the test run: under hypothesis always, and under
atheris (coverage-guided) for a bounded 20 s where atheris is installed."""

from __future__ import annotations

import base64
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "fuzz"))

import wire_fuzz

FUZZ = Path(__file__).resolve().parent.parent / "fuzz" / "wire_fuzz.py"

# Found by atheris: an OPT record in the answer section made strip_opt underflow ARCOUNT.
OPT_IN_ANSWER = base64.b64decode(
    "AQAAAAAAAAABAAAAAAAAKQAAAAAACAApAEEAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAM=")


@given(st.binary(max_size=700))
@example(OPT_IN_ANSWER)
@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fuzz_target_holds_under_hypothesis(data: bytes) -> None:
    wire_fuzz.check(data)


@given(kind=st.integers(0, 2), header=st.binary(min_size=12, max_size=12),
       labels=st.lists(st.binary(min_size=1, max_size=10), max_size=5),
       tail=st.binary(max_size=200))
@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fuzz_target_holds_for_near_valid_messages(kind: int, header: bytes,
                                                   labels: list[bytes], tail: bytes) -> None:
    name = b"".join(bytes([len(label)]) + label for label in labels) + b"\x00"
    wire_fuzz.check(bytes([kind]) + header + name + tail)


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None,
                    reason="atheris is not installed (pip install atheris)")
@pytest.mark.timeout(150)  # 20 s of fuzzing after atheris instruments the package (~40 s here)
def test_fuzz_target_holds_under_atheris_for_20_seconds(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, str(FUZZ), "-max_total_time=20",
                          "-rss_limit_mb=2048", "-print_final_stats=1"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Done" in run.stderr and not list(tmp_path.glob("crash-*"))


def test_an_opt_record_outside_the_additional_section_is_malformed() -> None:
    from tiktokguard.dns.wire import index_response

    with pytest.raises(ValueError, match="OPT record outside"):
        index_response(OPT_IN_ANSWER[1:])  # (the first byte picks the fuzz target)
