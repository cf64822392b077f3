"""var-bench on tiny random-weight models: the table's invariants, the report files, defensive discovery."""
import json

import numpy as np
import pytest
import torch

from var.errors import ConfigError
from var.eval import discovery
from var.eval.benchmark import run_benchmark
from var.eval.report import write_report


@pytest.fixture(scope="module")
def report():
    policies = discovery.discover_cache_policies()
    cheap = tuple(p for p in ("StreamingLLM",) if p in policies)
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


def test_probe_learns_settings_a_kwargs_sampler_rejects():
    def inner(model, tok, labels_B, *, generator=None, cfg=1.0):
        return (model, tok, labels_B.tolist(), cfg)

    def sample_wrapped(model, tok, labels_B, **kwargs):
        return inner(model, tok, labels_B, **kwargs)

    entry = discovery.SamplerEntry("wrapped", __name__, sample_wrapped, ("model", "tok", "labels_B", "kwargs"))
    comps = {"model": "M", "tok": "T"}
    out = discovery.probe_sampler(entry, comps, torch.tensor([3]), cfg=2.0, cfg_scale=2.0, window=16)
    assert out == ("M", "T", [3], 2.0) and entry.rejected == {"cfg_scale", "window"}
    assert discovery.call_sampler(entry, comps, torch.tensor([1]), generator=None, cfg=3.0, window=4)[-1] == 3.0
    with pytest.raises(ConfigError):
        discovery.call_sampler(entry, {"model": "M"}, torch.tensor([1]), generator=None)  # no tokenizer


def test_discovery_skips_broken_modules(monkeypatch):
    import importlib
    real = importlib.import_module

    def flaky(name, *a, **k):
        if name == "var.samplers.next_token":
            raise SyntaxError("half-written file")
        return real(name, *a, **k)

    monkeypatch.setattr(discovery.importlib, "import_module", flaky)
    found = discovery.discover_samplers()
    assert "next_scale" in found and "next_token" not in found
    policies = discovery.discover_cache_policies()
    assert "FullCache" in policies
    assert not any(e.cls.__name__ == "CompressionPolicy" for e in policies.values())  # interfaces are not rows


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
