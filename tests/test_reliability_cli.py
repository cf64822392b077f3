"""Issue 13: command lines that lost work or ended in a traceback / exit status 1 on bad input instead of one
``error:`` line and exit status 2 (see docs/reliability.md)."""
import pytest
import torch

from var.errors import ConfigError


def _var_sample(argv):
    from var.cli.sample import cli
    return cli(argv)


def test_var_sample_writes_each_batch_as_it_is_done(tmp_path, monkeypatch):
    import dataclasses
    import functools

    from var.samplers.registry import SAMPLERS
    spec, calls = SAMPLERS["next_scale"], []

    @functools.wraps(spec.fn)  # the registry reads the knobs' defaults from the signature
    def dies_in_the_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the user's kill
        return spec.fn(*args, **kwargs)
    monkeypatch.setitem(SAMPLERS, "next_scale", dataclasses.replace(spec, fn=dies_in_the_third_batch))
    with pytest.raises(KeyboardInterrupt):
        _var_sample(["--random-init", "--num-images", "6", "--batch-size", "2", "--device", "cpu",
                     "--out", str(tmp_path / "g.png"), "--out-dir", str(tmp_path / "pngs")])
    assert sorted(p.name for p in (tmp_path / "pngs").iterdir()) == [f"{i:06d}.png" for i in range(4)]


@pytest.mark.parametrize("argv,message", [
    (["--out", "grid.txt"], "grid.txt"),                # unknown image extension: found before sampling
    (["--out-dir", "FILE"], "FILE"),                     # --out-dir is an existing file
    (["--num-images", "0"], "num-images"),
    (["--batch-size", "0"], "batch-size"),
    (["--vae", "x.pth"], "--var"),                        # the pair checks: exit 2, not 1
    (["--family", "ar", "--gpt", "x.pt"], "--vq"),
])
def test_var_sample_bad_input_is_one_error_line_with_status_2(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "FILE").write_text("")
    import var.samplers as samplers

    def never(*a, **k):
        raise AssertionError("sampled before checking the arguments")
    monkeypatch.setattr(samplers, "sample_next_scale", never)
    assert _var_sample(["--random-init", "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err and "Traceback" not in err


def _status_and_error(cli, argv, capsys):
    try:
        status = cli(argv)
    except SystemExit as e:  # argparse's own usage errors: one line, status 2
        status = e.code
    err = capsys.readouterr().err
    return status, err


@pytest.mark.parametrize("argv,message", [
    (["--cfg", "inf"], "cfg"),
    (["--family", "ar", "--cfg", "inf"], "cfg"),
    (["--temperature", "1e-30"], "temperature"),
    (["--device", "cuda"], "CUDA"),
    (["--device", "tpu7"], "device"),
])
def test_var_sample_bad_sampling_settings_and_devices_are_errors(tmp_path, capsys, argv, message):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    from var.cli.sample import cli
    status, err = _status_and_error(cli, ["--random-init", "--num-images", "1", "--out", str(tmp_path / "g.png"),
                                          *argv], capsys)
    assert status == 2 and message in err and "Traceback" not in err


def test_non_finite_probabilities_are_a_named_error_not_a_torch_runtime_error():
    from var.errors import NonFiniteLogitsError
    from var.samplers.logits import multinomial
    with pytest.raises(NonFiniteLogitsError):
        multinomial(torch.tensor([[0.5, float("nan")]]))


def test_var_train_malformed_config_file_and_missing_cuda_are_errors(tmp_path, capsys):
    from var.cli.train import cli
    bad = tmp_path / "run.json"
    bad.write_text('{"train": {"lr": 1e-3,}')
    status, err = _status_and_error(cli, ["tokenizer-ms", "--config", str(bad), "--out-dir", str(tmp_path / "o")],
                                    capsys)
    assert status == 2 and "run.json" in err
    if not torch.cuda.is_available():
        status, err = _status_and_error(cli, ["tokenizer-ms", "--device", "cuda", "--steps", "1",
                                              "--out-dir", str(tmp_path / "c")], capsys)
        assert status == 2 and "CUDA" in err


def test_var_eval_config_errors_exit_2_and_a_corrupt_npz_is_named(tmp_path, capsys):
    from var.cli.eval import cli
    status, err = _status_and_error(cli, ["sample", "--random-init", "--out", str(tmp_path / "x"),
                                          "--sampler", "nope", "--device", "cpu"], capsys)
    assert status == 2 and "invalid choice: 'nope'" in err
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 not really a zip")
    status, err = _status_and_error(cli, ["metrics", str(tmp_path / "bad.npz"), "--ref", "procedural",
                                          "--evaluator", "offline", "--device", "cpu"], capsys)
    assert status == 2 and "bad.npz" in err and "Traceback" not in err


@pytest.mark.parametrize("sampler,kwargs,message", [("sjd", dict(window=10 ** 9), "window"),
                                                    ("gsd", dict(group_size=10 ** 9), "group"),
                                                    ("zipar", dict(window=10 ** 9), "window")])
def test_huge_windows_and_groups_are_capped_with_a_named_error(sampler, kwargs, message):
    from var.models import create
    from var.samplers import jacobi, neighbor
    torch.manual_seed(0)
    vq, gpt = create("vq_tiny").eval(), create("gpt_tiny").eval()
    fn = {"sjd": jacobi.sample_jacobi, "gsd": jacobi.sample_gsd, "zipar": neighbor.sample_zipar}[sampler]
    with pytest.raises(ConfigError, match=message):
        fn(gpt, vq, torch.tensor([0]), generator=torch.Generator().manual_seed(0), **kwargs)


def test_two_eval_sample_runs_on_one_out_dir_do_not_both_write(tmp_path):
    import fcntl
    from var.eval.distributed import SamplingPlan, generate_samples

    def sample_fn(labels, generator):
        return torch.rand(len(labels), 3, 8, 8, generator=generator), {}
    plan = SamplingPlan(num_images=2, num_classes=2, shard_size=1)
    tmp_path.mkdir(exist_ok=True)
    with open(tmp_path / ".lock", "a") as held:  # what the first run holds while it samples
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ConfigError, match="another"):
            generate_samples(sample_fn, tmp_path, plan, {}, progress=False, pack=False)
    generate_samples(sample_fn, tmp_path, plan, {}, progress=False, pack=False)  # released: runs
    assert len(list((tmp_path / "images").glob("*.png"))) == 2


def test_var_bench_never_writes_into_benchmarks_by_default_and_unknown_families_are_errors(tmp_path, monkeypatch):
    from var.cli.bench import build_parser, main
    assert build_parser().parse_args([]).out_dir is None  # default: a fresh temporary folder, printed
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="nope"):
        main(["--families", "nope", "--device", "cpu"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sampler", ["sjd", "mcsjd", "lantern", "gsd", "zipar"])
def test_samplers_without_a_cache_policy_refuse_cache_flags_by_name(tmp_path, capsys, sampler):
    """SJD with ``--cache`` crashed inside the sampler (it writes the dense cache's K/V buffers): now one error line
    naming the sampler and the flag, status 2, before any model is loaded."""
    from var.cli.sample import cli
    status = cli(["--random-init", "--device", "cpu", "--sampler", sampler, "--cache", "SnapKV", "--budget", "0.5",
                  "--out", str(tmp_path / "g.png")])
    err = capsys.readouterr().err
    assert status == 2 and "error:" in err and sampler in err and "--cache" in err and "Traceback" not in err
