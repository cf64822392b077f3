"""Every ``var-bench`` subcommand (the former scripts/*.py) runs end to end on tiny settings and writes its report;
the scripts themselves are thin wrappers over it."""
import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

from var.cli.bench import SUBCOMMANDS, main
from var.errors import ConfigError

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def test_kv_subcommand(tmp_path):
    assert main(["kv", "--images", "1", "--budgets", "0.5", "--policies", "streamingllm", "--out-dir", str(tmp_path),
                 "--name", "kv"]) == 0
    report = json.loads((tmp_path / "kv.json").read_text())
    assert [r["policy"] for r in report["policies"]][-1] == "streamingllm" and report["arithmetic"]
    assert (tmp_path / "kv.md").read_text().startswith("#")


def test_ar_subcommand(tmp_path):
    out = tmp_path / "ar.json"
    assert main(["ar", "--preset", "gpt_tiny", "--num-images", "2", "--batch-size", "2", "--repeats", "1",
                 "--only", "next_token", "sjd L=16", "zipar s=W/2", "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"next_token", "sjd L=16", "sjd L=16 horizon", "zipar s=W/2"}
    assert results["next_token"]["forward_passes_per_batch"] == 16  # gpt_tiny: 4 x 4 tokens


def test_code_nar_ctf_subcommand(tmp_path):
    out = tmp_path / "c.json"
    assert main(["code-nar-ctf", "--size", "tiny", "--repeats", "1", "--out", str(out)]) == 0
    names = [r["sampler"] for r in json.loads(out.read_text())["rows"]]
    assert any(n.startswith("CoDe N=") for n in names) and any(n.startswith("NAR") for n in names)
    assert any(n.startswith("CTF") for n in names)


def test_var_speed_subcommand(tmp_path):
    assert main(["var-speed", "--model", "var_tiny", "--tokenizer", "msvq_tiny", "--batch-sizes", "1", "--modes",
                 "recompute", "cached", "--repeats", "1", "--out", str(tmp_path / "v")]) == 0
    rows = json.loads((tmp_path / "v.json").read_text())["rows"]
    assert [r["mode"] for r in rows] == ["recompute", "cached"] and all(r["same_tokens_as_first_mode"] for r in rows)


def test_original_subcommand_refuses_a_folder_that_is_no_checkout(tmp_path):
    with pytest.raises(ConfigError, match="not a checkout"):
        main(["original", "--original", str(tmp_path)])


BENCH_SCRIPTS = {"bench_kv.py": "kv", "bench_samplers.py": "ar", "bench_code_nar_ctf.py": "code-nar-ctf",
                 "bench_var.py": "var-speed", "eval_bundled.py": "bundled", "compare_with_original.py": "original",
                 "bench_infinity_kv.py": "infinity-kv", "compare_infinity_with_original.py": "original-infinity",
                 "compare_llamagen_t2i.py": "original-llamagen-t2i", "eval_t2i_bundled.py": "t2i-bundled"}


@pytest.mark.parametrize("script, command", sorted(BENCH_SCRIPTS.items()))
def test_scripts_are_thin_wrappers(script, command, monkeypatch, capsys):
    text = (SCRIPTS / script).read_text()
    assert f'cli(["{command}", ' in text and command in SUBCOMMANDS
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(SCRIPTS / script), run_name="__main__")
    assert exit_.value.code == 0 and f"var-bench {command}" in capsys.readouterr().out


def test_every_script_is_a_few_lines_without_import_path_edits():
    scripts = sorted(SCRIPTS.glob("*.py"))
    assert len(scripts) >= len(BENCH_SCRIPTS) + 4  # + bench, eval, sample, train
    for path in scripts:
        text = path.read_text()
        assert len(text.splitlines()) <= 8 and "sys.path" not in text, path.name
        assert "from var.cli." in text and "sys.exit(cli(" in text, path.name
    assert set(SUBCOMMANDS) == set(BENCH_SCRIPTS.values())  # every subcommand keeps its script name


def test_infinity_kv_subcommand(tmp_path):
    assert main(["infinity-kv", "--num-images", "1", "--budgets", "0.5", "--depth", "2", "--out-dir",
                 str(tmp_path)]) == 0
    report = json.loads((tmp_path / "infinity_kv_cpu.json").read_text())
    assert [r["policy"] for r in report["rows"]] == ["full", "ScaleKV 50%", "HACK 50%", "SnapKV 50%"]
    full = report["rows"][0]
    assert full["bits_agree"] == 1.0 and full["psnr_vs_full_db"] == float("inf")
    assert all(r["peak_kv_live_mib"] <= full["peak_kv_live_mib"] for r in report["rows"])
    assert (tmp_path / "infinity_kv_cpu.md").read_text().startswith("# KV-cache policies")
    assert torch.is_grad_enabled()  # the caller's grad mode is left as it was


@pytest.mark.parametrize("command, package", [("original-infinity", "Infinity"),
                                              ("original-llamagen-t2i", "LlamaGen")])
def test_original_comparisons_refuse_a_folder_that_is_no_checkout(command, package, tmp_path):
    with pytest.raises(ConfigError, match=f"not a checkout of FoundationVision/{package}"):
        main([command, "--original", str(tmp_path)])


def test_t2i_bundled_subcommand(tmp_path):
    from var.assets import bundled_t2i_dir
    if bundled_t2i_dir() is None:
        pytest.skip("no bundled text-to-image model installed")
    assert main(["t2i-bundled", "--samplers", "--only", "next_token", "--max-prompts", "2", "--out-dir",
                 str(tmp_path)]) == 0
    report = json.loads((tmp_path / "t2i_bundled_samplers.json").read_text())
    assert report["prompts"] == 4 and [r["sampler"] for r in report["rows"]] == ["next_token"]
    assert 0 <= report["rows"][0]["seen"] <= 1 and report["rows"][0]["passes_per_batch"] > 1
    with pytest.raises(ConfigError, match="--accuracy"):
        main(["t2i-bundled", "--out-dir", str(tmp_path)])


@pytest.mark.slow  # ~1 min on a loaded 2-core CPU: the classifier runs on 1000 held-out images
def test_bundled_subcommand(tmp_path):
    from var.assets import bundled_var_dir
    if bundled_var_dir() is None:
        pytest.skip("no bundled VAR model installed")
    assert main(["bundled", "--per-class", "1", "--batch", "10", "--recon-images", "16", "--skip-ar",
                 "--out", str(tmp_path / "q"), "--img-dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "q.json").read_text())
    assert report["var"]["var_sample_defaults"]["settings"] == {"cfg": 1.5, "top_k": 900, "top_p": 0.96}
    assert {"shape_accuracy", "texture_accuracy", "per_class_texture_accuracy"} <= set(report["var"]["var_sample_defaults"])
    assert (tmp_path / "bundled_var_samples.png").exists() and (tmp_path / "q.md").exists()
