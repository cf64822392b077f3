"""Issue 13: command lines that lost work or ended in a traceback / exit status 1 on bad input instead of one
``error:`` line and exit status 2 (see docs/reliability.md)."""
import pytest
import torch

from var.errors import ConfigError


def _var_sample(argv):
    from var.cli.sample import cli
    return cli(argv)


def test_var_sample_writes_each_batch_as_it_is_done(tmp_path, monkeypatch):
    import var.samplers as samplers
    original, calls = samplers.sample_next_scale, []

    def dies_in_the_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the user's kill
        return original(*args, **kwargs)
    monkeypatch.setattr(samplers, "sample_next_scale", dies_in_the_third_batch)
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
