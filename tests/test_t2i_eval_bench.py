"""The text-to-image next-token GPT in ``var-eval sample`` (a prompts file plays the classes) and in the one
``var-bench`` table (Infinity and the bundled text-to-image GPT as setups, with their own columns)."""
import json

import numpy as np
import pytest

from var.cli.eval import main as eval_main
from var.errors import ConfigError, PromptError


def test_var_eval_sample_text_to_image_gpt_with_a_prompts_file(tmp_path):
    """The bundled text-to-image GPT with any next-token sampler: image i answers prompt i % P, the record names
    the prompts and the bundle's weights."""
    (tmp_path / "p.txt").write_text("a pink star\na teal square with horizontal stripes\n")
    rc = eval_main(["sample", "--sampler", "sjd", "--prompts-file", str(tmp_path / "p.txt"), "--per-class", "2",
                    "--shard-size", "2", "--out", str(tmp_path / "eval"), "--device", "cpu", "--cfg-scale", "2"])
    assert rc == 0
    assert len(list((tmp_path / "eval" / "images").glob("*.png"))) == 4
    assert np.load(tmp_path / "eval" / "images.npz")["arr_0"].shape[0] == 4
    record = json.loads((tmp_path / "eval" / "sampling.json").read_text())
    text = json.dumps(record)
    assert "a teal square with horizontal stripes" in text and "t2i_bundled" in text and '"sjd"' in text
    assert "cfg_scale" in text


def test_var_eval_sample_text_to_image_bad_input(tmp_path):
    (tmp_path / "p.txt").write_text("a pink star\n\na red ring\n")
    with pytest.raises(PromptError, match="p.txt:2: empty line"):
        eval_main(["sample", "--sampler", "next_token", "--prompts-file", str(tmp_path / "p.txt"),
                   "--out", str(tmp_path / "e"), "--device", "cpu"])
    (tmp_path / "q.txt").write_text("a pink star\n")
    with pytest.raises(ConfigError, match="not a next-token sampler|prompts"):
        eval_main(["sample", "--sampler", "next_scale", "--prompts-file", str(tmp_path / "q.txt"),
                   "--out", str(tmp_path / "e2"), "--device", "cpu"])


def test_var_bench_table_has_infinity_and_the_text_to_image_gpt(tmp_path, monkeypatch):
    """var-bench with a prompts file: Infinity (small random, tiny random T5) with ScaleKV / HACK at 10 % and 100 %
    (PSNR vs the full cache, KV bytes allocated and live), and the bundled text-to-image GPT with next-token samplers
    (passes, NLL, attribute accuracy)."""
    from var.cli.bench import main as bench_main
    monkeypatch.setenv("VAR_KERNELS", "torch")  # the PyTorch reference selection (the Triton interpreter is slow)
    (tmp_path / "p.txt").write_text("a pink star\na teal square with horizontal stripes\na red ring\n")
    assert bench_main(["--families", "infinity", "text-to-image", "--prompts-file", str(tmp_path / "p.txt"),
                       "--samplers", "infinity", "next_token", "sjd", "--policies", "ScaleKV", "HACK",
                       "--budgets", "1.0", "0.1", "--num-images", "4", "--batch", "4", "--repeats", "1",
                       "--timed-runs", "1", "--extractor", "random-conv", "--device", "cpu",
                       "--out-dir", str(tmp_path), "--tag", "t"]) == 0
    report = json.loads((tmp_path / "t.json").read_text())
    assert report["settings"]["prompts"][1] == "a teal square with horizontal stripes" and not report["skipped"]
    rows = {(r["family"].split(" ")[0] + " " + r["family"].split(" ")[1], r["sampler"], r["cache"], r["budget"]): r
            for r in report["rows"]}
    inf = "infinity_tiny +"
    full = rows[(inf, "infinity", "full", None)]
    assert full["is_reference"] and full["passes"] == 7 and full["kv_live_bytes"] > 0 and full["nll"] is None
    for policy in ("ScaleKV", "HACK"):
        exact, small = rows[(inf, "infinity", policy, 1.0)], rows[(inf, "infinity", policy, 0.1)]
        assert exact["token_agreement"] == 1.0 and exact["psnr_vs_full_db"] == float("inf")
        assert small["kv_live_bytes"] < full["kv_live_bytes"] and 0 < small["psnr_vs_full_db"] < float("inf")
    t2i = "bundled text-to-image"
    ref, sjd = rows[(t2i, "next_token", "full", None)], rows[(t2i, "sjd", "full", None)]
    assert ref["is_reference"] and ref["passes"] == 64 and sjd["passes"] < 64
    for r in (ref, sjd):
        assert 0 < r["nll"] < 20 and 0 <= r["attr_acc"] <= 1 and r["psnr_vs_full_db"] is None
    md = (tmp_path / "t.md").read_text()
    assert "| PSNR (dB) | NLL | attr |" in md and "infinity_tiny" in md
