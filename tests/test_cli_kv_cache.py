"""Issue 15: ScaleKV / HACK from the command line (--cache, --budget, --kv-profile on var-sample, var-eval sample and
var-bench; var-eval calibrate). The CLIs refuse ScaleKV/HACK without a calibration profile unless told to
calibrate on the fly: uncalibrated they would treat every layer as a refiner and every head as structural."""
import json
import logging

import pytest
import torch

from var.cli.eval import main as eval_main
from var.cli.sample import main as sample_main
from var.errors import ConfigError

RANDOM = ["--random-init", "--device", "cpu", "--classes", "1", "2"]


@pytest.mark.parametrize("policy", ["ScaleKV", "HACK"])
def test_profiled_policies_are_refused_without_a_profile(tmp_path, policy):
    with pytest.raises(ConfigError, match="needs a calibration profile.*--kv-profile"):
        sample_main([*RANDOM, "--cache", policy, "--budget", "0.5", "--out", str(tmp_path / "g.png")])
    with pytest.raises(ConfigError, match="needs a calibration profile"):
        eval_main(["sample", "--random-init", "--device", "cpu", "--num-images", "2", "--cache", policy,
                   "--budget", "0.5", "--out", str(tmp_path / "e")])
    assert not (tmp_path / "g.png").exists() and not (tmp_path / "e").exists()


def test_calibrate_command_writes_a_profile_that_sampling_takes(tmp_path):
    assert eval_main(["calibrate", "--random-init", "--device", "cpu", "--out", str(tmp_path / "p.json")]) == 0
    profile = json.loads((tmp_path / "p.json").read_text())
    assert profile["model"]["depth"] >= 1 and len(profile["asi"]) == profile["model"]["depth"]
    assert sample_main([*RANDOM, "--cache", "ScaleKV", "--budget", "0.5", "--kv-profile", str(tmp_path / "p.json"),
                        "--out", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").exists()


def test_a_full_budget_calibrated_on_the_fly_gives_the_full_cache_images(tmp_path):
    sample_main([*RANDOM, "--out", str(tmp_path / "full.png")])
    sample_main([*RANDOM, "--cache", "ScaleKV", "--budget", "1.0", "--kv-profile", "calibrate",
                 "--out", str(tmp_path / "scalekv.png")])
    assert (tmp_path / "full.png").read_bytes() == (tmp_path / "scalekv.png").read_bytes()


def test_a_profile_of_another_model_is_a_named_error(tmp_path):
    from var.kernels.policies.calibration import bundled_profile_path
    if not bundled_profile_path().exists():
        pytest.skip("no bundled calibration profile installed")
    with pytest.raises(ConfigError, match="calibration profile is for"):
        sample_main([*RANDOM, "--cache", "HACK", "--budget", "0.5", "--kv-profile", "bundled",
                     "--out", str(tmp_path / "g.png")])


def test_the_bundled_var_takes_its_shipped_profile_by_default(tmp_path, caplog):
    from var.assets import bundled_var_dir
    if bundled_var_dir() is None:
        pytest.skip("no bundled VAR installed")
    with caplog.at_level(logging.INFO):
        assert sample_main(["--device", "cpu", "--classes", "0", "--cache", "ScaleKV", "--budget", "0.25",
                            "--out", str(tmp_path / "g.png")]) == 0
    assert "shipped calibration profile" in caplog.text


@pytest.mark.parametrize("argv,message", [
    (["--kv-profile", "calibrate"], "--kv-profile is the calibration profile of --cache ScaleKV or HACK"),
    (["--cache", "SnapKV", "--budget", "0.5", "--kv-profile", "calibrate"], "not of SnapKV"),
    (["--cache", "ScaleKV"], "needs a budget"),
    (["--budget", "0.5"], "needs a compression policy"),
    (["--sampler", "next_token", "--cache", "SnapKV", "--budget", "0.5"], "takes no cache policy"),
    (["--sampler", "collaborative", "--draft-steps", "2", "--cache", "ScaleKV", "--budget", "0.5",
      "--kv-profile", "calibrate"],
     "not supported from the command line"),
])
def test_cache_flags_that_cannot_work_fail_before_loading(tmp_path, argv, message):
    with pytest.raises(ConfigError, match=message):
        sample_main(["--random-init", "--device", "cpu", *argv, "--out", str(tmp_path / "g.png")])


def test_var_bench_takes_the_bundled_profile_by_name():
    from var.eval.benchmark import Setup, _policy_factories
    from var.kernels.policies.calibration import bundled_profile_path
    from var.models import create
    if not bundled_profile_path().exists():
        pytest.skip("no bundled calibration profile installed")
    torch.manual_seed(0)
    setup = Setup("bundled VAR (stand-in)", {"model": create("var_tiny").eval(), "tokenizer": create("msvq_tiny")},
                  "next_scale", True, 10, compress=True)
    (name, _, factory), = _policy_factories(setup, (0.5,), "cpu", only={"ScaleKV"}, kv_profile="bundled")
    assert name == "ScaleKV" and factory().profile.meta == json.loads(bundled_profile_path().read_text())["meta"]
    with pytest.raises(ConfigError, match="kv_profile must be one of"):
        from var.eval.benchmark import run_benchmark
        run_benchmark(kv_profile="shipped")
