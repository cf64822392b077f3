"""Checkpoint files (released-style .pth, safetensors directories, wrappers, bad files) and the var-sample CLI."""
import pytest
import torch
from PIL import Image

from helpers import tiny_var_pair
from var import hub
from var.cli.sample import main as sample_main
from var.errors import CheckpointError, CheckpointMismatchError
from var.samplers import sample_next_scale


@pytest.fixture()
def released_style_files(tmp_path):
    """The tiny VAR saved like the released files (a plain pickled state dict); the tiny tokenizer uses 8
    GroupNorm groups, which a plain state dict cannot record, so it is saved with its config."""
    tok, model = tiny_var_pair()
    hub.save_pretrained(tok, tmp_path / "vae")
    torch.save(model.state_dict(), tmp_path / "var_tiny.pth")
    return tok, model, tmp_path


def test_load_var_infers_the_config_and_reproduces_samples(released_style_files):
    tok, model, d = released_style_files
    tok2, model2 = hub.load_var(d / "vae", d / "var_tiny.pth")
    assert model2.config == model.config and tok2.config == tok.config
    a = sample_next_scale(model, tok, [1, 2], generator=torch.Generator().manual_seed(0))
    b = sample_next_scale(model2, tok2, [1, 2], generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.images, b.images)


def test_save_pretrained_round_trip_is_bit_identical(tmp_path):
    tok, model = tiny_var_pair()
    hub.save_pretrained(tok, tmp_path / "tokenizer")
    hub.save_pretrained(model, tmp_path / "transformer")
    tok2, model2 = hub.load_var(tmp_path / "tokenizer", tmp_path / "transformer")
    for a, b in ((tok, tok2), (model, model2)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_training_wrapper_dicts_are_unwrapped(tmp_path):
    _, model = tiny_var_pair()
    torch.save({"model": model.state_dict(), "steps": 3}, tmp_path / "ckpt.pth")
    assert hub.load_var_transformer(tmp_path / "ckpt.pth").config == model.config


def test_expected_depth_mismatch_is_named(released_style_files):
    _, _, d = released_style_files
    with pytest.raises(CheckpointMismatchError, match="depth-2"):
        hub.load_var_transformer(d / "var_tiny.pth", depth=16)


def test_swapped_files_are_rejected(released_style_files):
    _, _, d = released_style_files
    with pytest.raises(CheckpointMismatchError, match="holds a MultiScaleVQVAE"):
        hub.load_var(d / "var_tiny.pth", d / "vae")


def test_preset_of_another_size_names_the_mismatch(released_style_files):
    _, _, d = released_style_files
    with pytest.raises(CheckpointMismatchError, match="shape mismatches"):
        hub.create_pretrained("var_d16", d / "var_tiny.pth")


def test_plain_tokenizer_state_dict_needs_the_released_group_count(tmp_path):
    tok, _ = tiny_var_pair()
    torch.save(tok.state_dict(), tmp_path / "tok.pth")
    with pytest.raises(CheckpointError, match="GroupNorm"):
        hub.load_var_tokenizer(tmp_path / "tok.pth", patch_nums=tok.patch_nums)


def test_missing_and_corrupt_files_raise_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        hub.load_var(tmp_path / "nope.pth", tmp_path / "nope2.pth")
    (tmp_path / "bad.pth").write_bytes(b"not a pickle at all")
    with pytest.raises(CheckpointError, match="cannot read"):
        hub.read_state_dict(tmp_path / "bad.pth")


def test_cli_writes_a_grid_and_a_folder(tmp_path, released_style_files):
    _, _, d = released_style_files
    grid = tmp_path / "grid.png"
    rc = sample_main(["--vae", str(d / "vae"), "--var", str(d / "var_tiny.pth"), "--classes", "1", "2", "3",
                      "--seed", "3", "--batch-size", "2", "--out", str(grid), "--out-dir", str(tmp_path / "pngs")])
    assert rc == 0 and Image.open(grid).size[0] >= 256
    pngs = sorted((tmp_path / "pngs").glob("*.png"))
    assert [p.name for p in pngs] == ["000000.png", "000001.png", "000002.png"]
    assert Image.open(pngs[0]).size == (16, 16)


def test_cli_default_runs_offline(tmp_path):
    assert sample_main(["--num-images", "2", "--out", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").exists()


def test_cli_rejects_unknown_class(tmp_path, released_style_files):
    from var.errors import ClassIdError
    _, _, d = released_style_files
    with pytest.raises(ClassIdError):
        sample_main(["--vae", str(d / "vae"), "--var", str(d / "var_tiny.pth"), "--classes", "5000",
                     "--out", str(tmp_path / "g.png")])


def test_console_script_reports_bad_input_in_one_line(tmp_path, released_style_files, capsys, monkeypatch):
    from var.cli.sample import cli
    from var.errors import ClassIdError
    _, _, d = released_style_files
    args = ["--vae", str(d / "vae"), "--var", str(d / "var_tiny.pth"), "--classes", "5000",
            "--out", str(tmp_path / "g.png")]
    monkeypatch.delenv("VAR_TRACEBACK", raising=False)
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert "error: class ids [5000] out of range" in err and "Traceback" not in err
    monkeypatch.setenv("VAR_TRACEBACK", "1")
    with pytest.raises(ClassIdError):
        cli(args)
