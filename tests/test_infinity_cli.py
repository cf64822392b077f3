"""var-sample --family infinity on tiny saved models and an offline tiny T5; bad input gives named errors."""
import json
import pytest
import torch

from infinity_helpers import tiny_infinity, tiny_vae
from var import hub
from var.cli.sample import cli, main
from var.models import create
from var.errors import AspectRatioError, CheckpointMismatchError, ConfigError, TextEncoderError

pytest.importorskip("transformers")
from t2i_helpers import save_tiny_t5  # noqa: E402


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("inf")
    hub.save_pretrained(tiny_vae(), d / "vae")
    hub.save_pretrained(tiny_infinity(), d / "model")  # 16-d text features, like the tiny T5
    save_tiny_t5(d / "t5")
    hub.save_pretrained(create("var_tiny"), d / "var_model")
    hub.save_pretrained(create("msvq_tiny"), d / "msvq")
    return d


def _args(d, *extra):
    return ["--family", "infinity", "--vae", str(d / "vae"), "--model", str(d / "model"), "--text-encoder",
            str(d / "t5"), "--pixels", "0.06M", "--device", "cpu", *extra]


def test_writes_images_for_prompts_and_a_prompts_file(saved, tmp_path):
    (tmp_path / "p.txt").write_text("a red fox\na blue square on the sea\n")
    rc = main(_args(saved, "--prompt", "a cat", "--prompts-file", str(tmp_path / "p.txt"), "--out",
                    str(tmp_path / "grid.png"), "--out-dir", str(tmp_path / "png"), "--batch-size", "2",
                    "--cfg-list", "2", "--tau-list", "0.5,0.5,0.5,0.5,0.6,0.6,0.7", "--embedding-cache", str(tmp_path / "cache")))
    assert rc == 0 and (tmp_path / "grid.png").is_file()
    pngs = sorted((tmp_path / "png").glob("*.png"))
    assert len(pngs) == 3
    from PIL import Image
    assert Image.open(pngs[0]).size == (64, 64)  # '0.06M' 1:1 = 16 x 16 tokens, tiny VAE stride 4
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 3


def test_bad_input_is_named(saved, tmp_path, capsys):
    with pytest.raises(ConfigError, match="negative prompts"):
        main(_args(saved, "--prompt", "a", "--prompt", "b", "--prompt", "c", "--negative-prompt", "x",
                   "--negative-prompt", "y"))
    with pytest.raises(AspectRatioError):
        main(_args(saved, "--prompt", "a cat", "--h-div-w", "7"))
    with pytest.raises(TextEncoderError, match="needs --text-encoder"):
        main(["--family", "infinity", "--vae", str(saved / "vae"), "--model", str(saved / "model"),
              "--prompt", "a cat"])
    with pytest.raises(ConfigError, match="--prompt"):
        main(_args(saved))
    with pytest.raises(ConfigError, match="--cfg-list"):  # VAR's --cfg (0 = none) is not Infinity's guidance
        main(_args(saved, "--prompt", "a cat", "--cfg", "3"))
    with pytest.raises(ConfigError, match="tau_list"):
        main(_args(saved, "--prompt", "a cat", "--tau-list", "0"))
    with pytest.raises(CheckpointMismatchError):  # a VAR transformer given as the Infinity model
        main(_args(saved, "--prompt", "a cat").__add__(["--model", str(saved / "var_model")]))
    with pytest.raises(CheckpointMismatchError):  # the Infinity model given as a VAR transformer
        main(["--vae", str(saved / "vae"), "--var", str(saved / "model"), "--device", "cpu"])
    assert cli(_args(saved)) == 2
    assert "error:" in capsys.readouterr().err
    # these fail before any file is read (the model path does not exist)
    missing_model = ["--family", "infinity", "--vae", str(saved / "vae"), "--model", str(tmp_path / "none.pth"),
                     "--pixels", "0.06M", "--device", "cpu", "--prompt", "a cat"]
    with pytest.raises(TextEncoderError, match="needs --text-encoder"):
        main(missing_model)
    with pytest.raises(ConfigError, match="cfg_list has 2 values for 7 scales"):
        main([*missing_model, "--text-encoder", str(saved / "t5"), "--cfg-list", "3,3"])
    with pytest.raises(AspectRatioError, match="no scale-schedule template"):
        main([*missing_model, "--text-encoder", str(saved / "t5"), "--h-div-w", "5"])
    with pytest.raises(TextEncoderError, match="does not exist"):
        main(_args(saved, "--prompt", "a cat").__add__(["--text-encoder", str(tmp_path / "no_t5")]))


def test_a_var_file_given_as_an_infinity_file_and_the_reverse_is_named_in_one_line(saved, tmp_path, capsys):
    """Plain state dicts (as released: var_d16.pth, infinity_2b_reg.pth, vae_ch160v4096z32.pth) given for the
    other family: the CLI names what the file is, in one line."""
    torch.save(create("var_tiny").state_dict(), tmp_path / "var_d.pth")
    torch.save(tiny_infinity().state_dict(), tmp_path / "infinity.pth")
    torch.save(create("msvq_tiny").state_dict(), tmp_path / "vae_ch.pth")
    torch.save({"vae": tiny_vae().state_dict()}, tmp_path / "infinity_vae.pth")
    t5 = ["--text-encoder", str(saved / "t5"), "--prompt", "a cat", "--device", "cpu"]
    cases = [
        (["--family", "infinity", "--vae", str(saved / "vae"), "--model", str(tmp_path / "var_d.pth"), *t5],
         "an Infinity transformer: var_d.pth is a VAR transformer file"),
        (["--family", "infinity", "--vae", str(tmp_path / "vae_ch.pth"), "--model", str(tmp_path / "infinity.pth"), *t5],
         "an Infinity BSQ VAE: vae_ch.pth is VAR's multi-scale VQ-VAE file"),
        (["--vae", str(saved / "msvq"), "--var", str(tmp_path / "infinity.pth"), "--device", "cpu"],
         "a VAR transformer: infinity.pth is an Infinity transformer file"),
        (["--family", "infinity", "--vae", str(saved / "vae"), "--model", str(saved / "var_model"), *t5],
         "an Infinity: .* holds a VAR"),
        (["--vae", str(tmp_path / "infinity_vae.pth"), "--var", str(tmp_path / "var_d.pth"), "--device", "cpu"],
         r"infinity_vae.pth does not hold a state dict of tensors \(it holds the entries \['vae'\]\)"),
    ]
    import re
    for argv, message in cases:
        capsys.readouterr()
        assert cli(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and re.search(message, err[0]), err


def test_var_eval_sample_infinity_with_a_prompts_file(saved, tmp_path):
    import numpy as np

    from var.cli.eval import main as eval_main

    (tmp_path / "p.txt").write_text("a red fox\na blue square on the sea\n")
    rc = eval_main(["sample", "--sampler", "infinity", "--vae", str(saved / "vae"), "--model", str(saved / "model"),
                    "--text-encoder", str(saved / "t5"), "--prompts-file", str(tmp_path / "p.txt"), "--per-class",
                    "1", "--shard-size", "2", "--out", str(tmp_path / "eval"), "--device", "cpu",
                    "--pixels", "0.06M", "--cfg-list", "1,1,2,2,3,3,3", "--tau-list", "0.9"])
    assert rc == 0
    record = json.loads((tmp_path / "eval" / "sampling.json").read_text())["settings"]
    assert record["cfg_list"] == [1, 1, 2, 2, 3, 3, 3] and record["tau_list"] == 0.9
    assert len(list((tmp_path / "eval" / "images").glob("*.png"))) == 2
    assert np.load(tmp_path / "eval" / "images.npz")["arr_0"].shape == (2, 64, 64, 3)
    from var.errors import ConfigError
    with pytest.raises(ConfigError, match="prompts-file"):  # var-eval raises its ConfigErrors (status 2 via cli)
        eval_main(["sample", "--sampler", "infinity", "--vae", str(saved / "vae"), "--model", str(saved / "model"),
                   "--out", str(tmp_path / "e2"), "--device", "cpu"])


def test_scalekv_on_infinity_needs_a_profile_or_calibrates_on_the_fly(saved, tmp_path):
    with pytest.raises(ConfigError, match="needs a calibration profile"):
        main(_args(saved, "--prompt", "a cat", "--cache", "ScaleKV", "--budget", "0.5", "--out",
                   str(tmp_path / "x.png")))
    full = main(_args(saved, "--prompt", "a cat", "--out", str(tmp_path / "full.png")))
    kept = main(_args(saved, "--prompt", "a cat", "--cache", "ScaleKV", "--budget", "1.0", "--kv-profile",
                      "calibrate", "--out", str(tmp_path / "scalekv.png")))
    assert full == kept == 0
    assert (tmp_path / "full.png").read_bytes() == (tmp_path / "scalekv.png").read_bytes()  # 100%: the full cache


def test_scalekv_with_a_released_budget_file(saved, tmp_path):
    """--kv-budgets: a budget file in the release's format (here for the 2-block model and the 7-scale schedule)
    replaces the profile; a file for another depth, another policy or a profile as well are named errors."""
    budgets = {"Scale 6": {"Block 0": 1, "Block 1": 0, "High": 1, "Max": 100, "Min": 20, "Limit": 121},
               "Scale 7": {"Block 0": 0, "Block 1": 1, "High": 1, "Max": 200, "Min": 40, "Limit": 244}}
    (tmp_path / "b.json").write_text(json.dumps(budgets))
    (tmp_path / "b3.json").write_text(json.dumps({k: {**v, "Block 2": 0} for k, v in budgets.items()}))
    flags = ["--prompt", "a cat", "--cache", "ScaleKV", "--budget", "0.1"]
    assert main(_args(saved, *flags, "--kv-budgets", str(tmp_path / "b.json"), "--out", str(tmp_path / "k.png"))) == 0
    assert (tmp_path / "k.png").is_file()
    with pytest.raises(ConfigError, match="for 3 layers, the model has 2"):
        main(_args(saved, *flags, "--kv-budgets", str(tmp_path / "b3.json")))
    with pytest.raises(ConfigError, match="needs --cache ScaleKV, not HACK"):
        main(_args(saved, "--prompt", "a cat", "--cache", "HACK", "--budget", "0.1", "--kv-budgets",
                   str(tmp_path / "b.json")))
    with pytest.raises(ConfigError, match="give --kv-profile or --kv-budgets"):
        main(_args(saved, *flags, "--kv-budgets", str(tmp_path / "b.json"), "--kv-profile", "calibrate"))


def test_embedding_cache_loads_the_text_encoder_only_for_new_prompts(saved, tmp_path):
    """var-sample and var-eval sample --embedding-cache: a rerun whose prompts are all cached never loads the text
    encoder (its directory is gone here: loading it would fail); a new prompt needs it."""
    import shutil

    from var.cli.eval import main as eval_main
    t5 = tmp_path / "t5"
    shutil.copytree(saved / "t5", t5)
    (tmp_path / "p.txt").write_text("a red fox\na blue square on the sea\n")
    cache = ["--embedding-cache", str(tmp_path / "cache")]
    sample = ["--family", "infinity", "--vae", str(saved / "vae"), "--model", str(saved / "model"), "--text-encoder",
              str(t5), "--pixels", "0.06M", "--device", "cpu", "--prompts-file", str(tmp_path / "p.txt"), *cache]
    evaluate = ["sample", "--sampler", "infinity", "--vae", str(saved / "vae"), "--model", str(saved / "model"),
                "--text-encoder", str(t5), "--prompts-file", str(tmp_path / "p.txt"), "--per-class", "1",
                "--device", "cpu", "--pixels", "0.06M", *cache]
    assert main([*sample, "--out", str(tmp_path / "a.png")]) == 0
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2
    shutil.rmtree(t5)
    assert main([*sample, "--out", str(tmp_path / "b.png")]) == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert eval_main([*evaluate, "--out", str(tmp_path / "eval")]) == 0
    assert len(list((tmp_path / "eval" / "images").glob("*.png"))) == 2
    with pytest.raises(TextEncoderError, match="does not exist"):  # a prompt not in the cache needs the encoder
        main([*sample, "--prompt", "a green circle", "--out", str(tmp_path / "c.png")])
    with pytest.raises(ConfigError, match="--embedding-cache is for --sampler infinity"):
        eval_main(["sample", "--sampler", "next_scale", "--random-init", "--out", str(tmp_path / "v"), *cache])
