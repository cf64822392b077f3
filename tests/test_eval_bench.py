"""var-bench on tiny random-weight models: the table's invariants, the report files, registry-driven rows."""
import json

import numpy as np
import pytest

from var.errors import ConfigError
from var.eval.benchmark import assign, build_setups, run_benchmark
from var.eval.report import write_report
from var.samplers.registry import SAMPLERS


@pytest.fixture(scope="module")
def report():
    cheap = ("StreamingLLM",)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VAR_KERNELS", "torch")  # the PyTorch reference kernels (the Triton interpreter is slow)
        rep = run_benchmark(num_images=8, batch=4, repeats=1, timed_runs=1, budgets=(1.0, 0.25), seed=0,
                            extractor="random-conv", samplers=("next_scale",), policies=cheap,
                            families=("var_tiny (random)",))
    return rep, cheap


def test_reference_rows_replay_themselves_and_full_budget_is_exact(report):
    rep, cheap = report
    rows = [r for r in rep["rows"] if r["family"] == "var_tiny (random)"]
    ref = [r for r in rows if r["is_reference"]]
    assert len(ref) == 1
    assert ref[0]["token_agreement"] == 1.0 and ref[0]["passes"] == 4  # var_tiny has 4 scales
    assert ref[0]["cache_bytes"] > 0 and ref[0]["images_per_s"] > 0 and ref[0]["latency_s"] > 0
    assert np.isfinite(ref[0]["fd"]) and ref[0]["fd"] >= 0
    for r in rows:
        if r["cache"] in cheap and r["budget"] == 1.0:
            assert r["token_agreement"] == 1.0  # keep-everything budget reproduces the full cache
        if r["cache"] in cheap and r["budget"] == 0.25:
            assert r["cache_bytes"] < ref[0]["cache_bytes"]
    assert rep["evaluator"].startswith("offline:random-conv")
    assert "var_tiny (random)" in rep["references"]


def test_report_files_name_the_machine(report, tmp_path):
    rep, _ = report
    paths = write_report(rep, tmp_path, "bench_test")
    md = paths["md"].read_text()
    assert rep["machine"] in md and rep["evaluator"] in md and "**next_scale**" in md
    assert json.loads(paths["json"].read_text())["rows"][0]["family"] == rep["rows"][0]["family"]
    from PIL import Image
    with Image.open(paths["png"]) as img:
        assert img.width > 100 and img.height > 100


def test_every_registered_sampler_runs_on_the_setups_whose_models_it_drives():
    setups = build_setups(seed=0)
    pairs, skipped = assign(setups)
    placed = {}
    for spec, setup in pairs:
        placed.setdefault(spec.name, set()).add(setup.name)
    assert skipped == [] and set(placed) == set(SAMPLERS)
    assert placed["infinity"] == {"infinity_tiny + tiny T5 (random)"}  # text-to-image: prompts play the classes
    assert "bundled text-to-image GPT (t2i_bundled)" in placed["sjd"]
    assert "gpt_tiny (random)" in placed["sjd"] and "nar_tiny (random)" not in placed["sjd"]  # a NAR is no GPT here
    assert placed["nar"] >= {"nar_tiny (random)"} and placed["collaborative"] >= {"var_tiny drafter + d1 refiner "
                                                                                   "(random)"}
    assert all(setup.reference in SAMPLERS for setup in setups)
    _, skipped = assign([s for s in setups if s.name != "ctf_tiny (random)"], only={"coarse_to_fine"})
    assert skipped == [{"sampler": "coarse_to_fine", "reason": "no setup with the models it drives "
                                                                "(stage1, stage2, tokenizer)"}]


def test_unknown_sampler_or_policy_is_an_error():
    with pytest.raises(ConfigError, match="nope"):
        run_benchmark(samplers=("nope",), num_images=1)
    with pytest.raises(ConfigError, match="Nope"):
        run_benchmark(policies=("Nope",), num_images=1)


def test_plot_without_matplotlib_falls_back_to_pil(report, tmp_path, monkeypatch):
    import sys
    from PIL import Image
    from var.eval.report import plot
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    path = plot(report[0], tmp_path / "p.png")
    with Image.open(path) as img:
        assert img.size == (900, 600)


def test_merge_reports_joins_rows_and_refuses_other_machines(report):
    from var.eval.report import merge_reports
    rep = report[0]
    other = {**rep, "rows": [{**r, "family": "other"} for r in rep["rows"]], "references": {"other": "x"},
             "skipped": [{"sampler": "next_scale", "reason": "not here"}]}
    merged = merge_reports([rep, other])
    assert len(merged["rows"]) == 2 * len(rep["rows"]) and set(merged["references"]) >= {"other"}
    assert not any(x["sampler"] == "next_scale" for x in merged["skipped"])  # it ran in the other report
    with pytest.raises(ConfigError):
        merge_reports([rep, {**rep, "machine": "another box"}])


def test_quality_columns_carry_95_percent_intervals_and_a_small_sample_warning(report):
    """Issue 13: with the smallest settings the full cache ranked worse than every compressed cache; every fd/kid
    now has its interval (bootstrap for fd, scaled subset std for kid) and few images add a warning."""
    from var.eval.report import to_markdown
    rep, _ = report
    for r in rep["rows"]:
        for key in ("fd", "kid"):
            lo, hi = r[f"{key}_ci95"]
            assert np.isfinite(lo) and np.isfinite(hi) and lo <= hi, (key, r)
        assert r["kid_ci95"][0] <= r["kid"] <= r["kid_ci95"][1]
    assert "noise" in rep["warning"]
    text = to_markdown(rep)
    assert "95%" in text and rep["warning"] in text
    assert any("[" in line and "fd" not in line for line in text.splitlines() if line.startswith("| var_tiny"))
