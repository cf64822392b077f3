"""var-eval metrics (offline evaluator) from the command line, and its refusal of unusable inputs."""
import json

import numpy as np
import pytest

from var.errors import ConfigError

from var.cli.eval import main
from var.eval.export import write_pngs


def test_metrics_cli_offline_prints_evaluator_and_writes_json(tmp_path, capsys):
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, size=(40, 16, 16, 3), dtype=np.uint8)
    write_pngs(ref, tmp_path / "ref", range(40))
    write_pngs(ref, tmp_path / "same", range(40))
    out = tmp_path / "m.json"
    assert main(["metrics", str(tmp_path / "same"), "--ref", str(tmp_path / "ref"), "--evaluator", "offline",
                 "--extractor", "random-conv", "--json", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["evaluator"].startswith("offline:random-conv") and res["fd_random_conv"] == pytest.approx(0.0, abs=1e-6)
    assert res["precision"] == 1.0 and res["recall"] == 1.0
    assert all(res["evaluator"] in line for line in printed.splitlines() if ":" in line and "warning" not in line)


def test_metrics_cli_needs_a_reference_offline(tmp_path):
    write_pngs(np.zeros((4, 8, 8, 3), np.uint8), tmp_path / "s", range(4))
    with pytest.raises(ConfigError):
        main(["metrics", str(tmp_path / "s"), "--evaluator", "offline"])


def test_sample_cli_unknown_sampler_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--random-init", "--out", str(tmp_path / "x"), "--sampler", "nope", "--device", "cpu"])
    err = capsys.readouterr().err
    assert "invalid choice: 'nope'" in err and "coarse_to_fine" in err  # the registry's names are the choices


def test_metrics_cli_saved_reference_statistics(tmp_path, capsys):
    rng = np.random.default_rng(1)
    ref = rng.integers(0, 256, size=(30, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "ref.npz", arr_0=ref)
    stats = tmp_path / "stats.npz"
    common = ["--evaluator", "offline", "--extractor", "random-conv", "--device", "cpu"]
    main(["metrics", str(tmp_path / "ref.npz"), "--ref", str(tmp_path / "ref.npz"), "--save-ref-stats", str(stats),
          *common])
    out = tmp_path / "r.json"
    main(["metrics", str(tmp_path / "ref.npz"), "--ref-stats", str(stats), "--json", str(out), *common])
    assert json.loads(out.read_text())["fd_random_conv"] == pytest.approx(0.0, abs=1e-6)
    with np.load(stats) as data:
        np.savez(tmp_path / "other.npz", mu=data["mu"], sigma=data["sigma"], evaluator=np.array("offline:other"))
    with pytest.raises(ConfigError, match="statistics of"):  # statistics of another extractor are refused
        main(["metrics", str(tmp_path / "ref.npz"), "--ref-stats", str(tmp_path / "other.npz"), *common])


def test_sample_cli_next_token_uses_the_bundled_ar_model_with_llamagen_defaults(tmp_path):
    from var.assets import bundled_ar_dir
    if bundled_ar_dir() is None:
        pytest.skip("no bundled AR model installed")
    out = tmp_path / "ar"
    assert main(["sample", "--sampler", "next_token", "--num-images", "2", "--out", str(out), "--device", "cpu"]) == 0
    settings = json.loads((out / "sampling.json").read_text())["settings"]
    assert settings["model"].startswith("bundled AR model")
    assert (settings["cfg_scale"], settings["top_k"], settings["top_p"]) == (2.0, 0, 0.0)  # the sampler's defaults
    assert np.load(out / "images.npz")["arr_0"].shape == (2, 32, 32, 3)


def test_metrics_cli_auto_without_inception_weights_uses_offline(tmp_path, monkeypatch, caplog):
    """The issue's case: torch-fidelity installed, no --inception-weights, nothing cached, `--ref procedural`: one
    warning line and offline numbers, never a download (a download would fail on this fake module)."""
    import sys
    import types
    fake = types.ModuleType("torch_fidelity")
    fake.calculate_metrics = lambda **kw: pytest.fail("torch-fidelity must not run without weights")
    monkeypatch.setitem(sys.modules, "torch_fidelity", fake)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "s.npz", arr_0=rng.integers(0, 256, size=(8, 16, 16, 3), dtype=np.uint8))
    out = tmp_path / "m.json"
    with caplog.at_level("WARNING", logger="var.eval.metrics"):
        assert main(["metrics", str(tmp_path / "s.npz"), "--ref", "procedural", "--extractor", "random-conv",
                     "--json", str(out), "--device", "cpu"]) == 0
    assert json.loads(out.read_text())["evaluator"].startswith("offline:random-conv")
    lines = [r.getMessage() for r in caplog.records if r.name == "var.eval.metrics" and "evaluator" in r.getMessage()]
    assert len(lines) == 1 and "no --inception-weights" in lines[0], lines
