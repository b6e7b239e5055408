"""hmlib.allocator: freed CPU memory kept for reuse changes no result, and can be turned off."""
import json
import os
import subprocess
import sys

import pytest

CHILD = """
import hashlib, json, torch
from hmlib.allocator import retain_freed_memory
from hmlib.backbone.model import ConvBackbone
from hmlib.evaluation.plain_adaptation import adapt_tasks
from hmlib.reproducibility import seeded
torch.set_num_threads(1)
applied = retain_freed_memory()
with seeded(0):
    backbone = ConvBackbone((8, 16, 16), 16, 4).eval()
    images = torch.randint(0, 256, (3, 40, 28, 28), dtype=torch.uint8)
z = adapt_tasks(backbone, images, 3, blend=1.0, steps=3, lr=0.01).embeddings
print(json.dumps({"applied": applied, "digest": hashlib.sha256(z.tobytes()).hexdigest()}))
"""


def run_child(system_malloc: bool) -> dict:
    env = {**os.environ, "HMLIB_SYSTEM_MALLOC": "1" if system_malloc else ""}
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
def test_retained_memory_changes_no_result_and_can_be_turned_off():
    system, retained = run_child(True), run_child(False)
    assert retained["applied"] is True  # glibc: mallopt accepted both settings
    assert system["applied"] is False  # HMLIB_SYSTEM_MALLOC=1 leaves malloc alone
    assert system["digest"] == retained["digest"]  # bit-identical embeddings after adaptation steps


def test_configure_runtime_keeps_freed_memory(monkeypatch):
    import hmlib
    from hmlib import allocator

    calls = []
    monkeypatch.setattr(allocator, "retain_freed_memory", lambda: calls.append(1) or True)
    hmlib.configure_runtime(hmlib.load_config("smoke"))
    assert calls == [1]
