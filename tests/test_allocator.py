"""hmlib.allocator: freed CPU memory kept for reuse changes no result, and can be turned off."""
import json
import os
import subprocess
import sys

import pytest

from hmlib import paths

BENCH = paths.REPO_ROOT / "benchmarks" / "bench_allocator.py"
APPLIED = "from hmlib.allocator import retain_freed_memory; print(retain_freed_memory())"


def applied(off: str) -> str:
    env = {**os.environ, "HMLIB_SYSTEM_MALLOC": off}
    return subprocess.run([sys.executable, "-c", APPLIED], env=env, check=True, capture_output=True,
                          text=True).stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
def test_retained_memory_changes_no_result_and_can_be_turned_off(tmp_path):
    # the benchmark adapts the same tasks in a process with glibc's default malloc and in one with freed memory kept,
    # and exits non-zero unless the embeddings are identical
    env = {**os.environ, "HMLIB_HOME": str(tmp_path)}
    subprocess.run([sys.executable, str(BENCH), "--tasks", "3", "--images", "40", "--steps", "3", "--threads", "1",
                    "--repeats", "1"], env=env, check=True, capture_output=True, text=True)
    figures = json.loads((tmp_path / "results" / "bench" / "allocator.json").read_text())
    assert figures["embeddings identical"] is True and figures["_applied"] is True  # glibc accepted both settings
    assert applied("1") == "False" and applied("") == "True"  # HMLIB_SYSTEM_MALLOC=1 leaves malloc alone


def test_configure_runtime_keeps_freed_memory(monkeypatch):
    import hmlib
    from hmlib import allocator

    calls = []
    monkeypatch.setattr(allocator, "retain_freed_memory", lambda: calls.append(1) or True)
    hmlib.configure_runtime(hmlib.load_config("smoke"))
    assert calls == [1]
