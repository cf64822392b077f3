"""The real torch-fidelity code path, end to end, once per run.

torch-fidelity imports torchvision, and the package registry has no torchvision for the suite's own torch (2.13, CPU
build): the test builds a separate virtual environment with the pair the registry serves, `TORCH_PAIR`, sees the
suite's numpy/scipy/pillow through ``--system-site-packages``, imports ``var`` from this checkout, writes random
Inception weights to a local file (nothing is downloaded but the pip install) and runs ``var-eval metrics``.

Cost: about 80 s and 5.3 GB in the temporary folder on a 2-core machine the first time (pip unpacks the CUDA build
of torch from the local wheel files); the environment is kept there, keyed by the requirements, and later runs
reuse it (about 30 s for the test itself). Outside CI a failed install skips the test with pip's reason; in CI
(``CI=true``) it fails.
"""
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCH_PAIR = ("torch==2.14.1", "torchvision==0.29.1")  # the pair the registry serves (torch-fidelity needs both)
FIDELITY = "torch-fidelity==0.4.0"
REQUIREMENTS = (*TORCH_PAIR, FIDELITY)
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _venv_dir() -> Path:
    key = hashlib.sha256(repr((REQUIREMENTS, sys.version, sys.executable)).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"var-fidelity-venv-{key}"


def _fidelity_python() -> Path:
    """The environment's python, built once under a file lock (parallel sessions share it)."""
    venv = _venv_dir()
    python, done = venv / "bin" / "python", venv / ".complete"
    with open(f"{venv}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            return python
        shutil.rmtree(venv, ignore_errors=True)  # a half-built one from an interrupted run
        env = {**os.environ, "PIP_NO_CACHE_DIR": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}  # nothing cached in ~
        steps = ([sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
                 [str(python), "-m", "pip", "install", "-q", *REQUIREMENTS])
        for cmd in steps:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
            if proc.returncode != 0:
                shutil.rmtree(venv, ignore_errors=True)
                tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-6:])
                message = f"cannot build the torch-fidelity environment ({' '.join(cmd[-4:])}):\n{tail}"
                if IN_CI:
                    pytest.fail(message)
                pytest.skip(f"wheels unavailable outside CI: {message}")
        done.write_text("\n".join(REQUIREMENTS) + "\n")
    return python


DRIVER = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    import numpy as np
    import torch
    import torch_fidelity.feature_extractor_inceptionv3 as fe
    from var.cli.eval import main
    from var.eval import metrics
    from var.train.data import ProceduralShapes

    out = Path(sys.argv[1])
    assert Path(fe.URL_INCEPTION_V3).name == metrics.INCEPTION_WEIGHTS_FILE, fe.URL_INCEPTION_V3

    # random Inception weights in a local file: the extractor built with its load steps skipped (never downloaded),
    # convolutions He-initialised so that features still differ between images after ~90 layers
    torch.manual_seed(0)
    load_url, load_sd = fe.load_state_dict_from_url, fe.FeatureExtractorInceptionV3.load_state_dict
    fe.load_state_dict_from_url = lambda *a, **k: {}
    fe.FeatureExtractorInceptionV3.load_state_dict = lambda self, sd, *a, **k: None
    net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    fe.load_state_dict_from_url, fe.FeatureExtractorInceptionV3.load_state_dict = load_url, load_sd
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    weights = out / "inception.pth"
    torch.save({k: v.clone() for k, v in net.state_dict().items()}, weights)

    data, ref = ProceduralShapes(8, image_size=32, seed=0), ProceduralShapes(8, image_size=32, seed=1)
    samples = np.stack([data.image_uint8(i) for i in range(len(data))])
    np.savez(out / "samples.npz", arr_0=samples)
    # 1. Inception metrics through torch-fidelity against the procedural reference (held-out seed 1)
    assert main(["metrics", str(out / "samples.npz"), "--ref", "procedural", "--inception-weights", str(weights),
                 "--device", "cpu", "--json", str(out / "fidelity.json")]) == 0
    # 2. the same reference as pool-3 statistics (torch-fidelity's network, this package's FID formula)
    ref_feats = metrics.inception_features(np.stack([ref.image_uint8(i) for i in range(len(ref))]),
                                           weights_path=weights, device="cpu")
    metrics.save_reference_statistics(ref_feats, out / "ref_stats.npz", "inception pool3")
    assert main(["metrics", str(out / "samples.npz"), "--ref-stats", str(out / "ref_stats.npz"), "--evaluator",
                 "torch-fidelity", "--inception-weights", str(weights), "--device", "cpu",
                 "--json", str(out / "stats.json")]) == 0
''')


def test_var_eval_metrics_through_real_torch_fidelity(tmp_path):
    python = _fidelity_python()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "TORCH_HOME": str(tmp_path / "torch_home"), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    (tmp_path / "driver.py").write_text(DRIVER)
    proc = subprocess.run([str(python), str(tmp_path / "driver.py"), str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "fidelity.json").read_text())
    assert result["evaluator"] == "torch-fidelity 0.4.0 (inception-v3-compat)", result
    for key in ("fid", "is_mean", "is_std", "kid_mean", "kid_std", "precision", "recall"):
        assert key in result and result[key] == result[key] and abs(result[key]) < float("inf"), (key, result)
    assert 0 <= result["precision"] <= 1 and 0 <= result["recall"] <= 1 and result["is_mean"] >= 1 - 1e-6
    assert result["fid"] > 0  # held-out reference images (seed 1) differ from the samples (seed 0)
    assert not list((tmp_path / "torch_home").rglob("*.pth")), "torch-fidelity downloaded weights"
    # torch-fidelity's FID (scipy) and this package's formula on features of the --ref-stats path agree
    stats_fid = json.loads((tmp_path / "stats.json").read_text())["fid"]
    assert abs(stats_fid - result["fid"]) <= 1e-3 * result["fid"], (stats_fid, result["fid"])
