"""Two runs on one HMLIB_HOME at once: atomic writes keep every artifact whole, and both runs finish."""
from __future__ import annotations

import os
import subprocess
import sys

from hmlib.artifacts import load_checkpoint
from hmlib.paths import REPO_ROOT

SCRIPT = """
import hmlib
from hmlib.vae import get_vae
cfg = hmlib.load_config("smoke", overrides={"vae": {"latent_dim": 4, "epochs": 1, "max_train_images": 120,
                                                    "batch_size": 32}})
hmlib.configure_runtime(cfg)
model, meta = get_vae(cfg, "shared", 0, progress=False)
print("VAE_ID", meta["vae_id"], meta["path"])
"""


def test_two_processes_building_the_same_artifacts_both_finish_with_whole_files(tiny_mirror, hmlib_home):
    env = {**os.environ, "HMLIB_HOME": str(hmlib_home), "HMLIB_DATA_DIR": str(tiny_mirror), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
    ids = [line.split()[1:] for out, _ in outputs for line in out.splitlines() if line.startswith("VAE_ID")]
    assert len(ids) == 2 and ids[0] == ids[1]  # same settings and seed: the same weights, whoever wrote last
    _, meta = load_checkpoint(ids[0][1])  # the file on disk is whole and loads
    assert meta["vae_id"] == ids[0][0]
    leftovers = [p for p in hmlib_home.rglob("*") if p.name.startswith(".hmlib-tmp-")]
    assert not leftovers  # no temporary file left behind
