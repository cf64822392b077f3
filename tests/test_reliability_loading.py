"""Issue 13, loaders: weights, configs and files that used to load into a silently wrong model or end in a raw
traceback (see docs/reliability.md)."""
import pytest
import torch

from infinity_helpers import tiny_infinity, tiny_vae
from var import hub
from var.errors import CheckpointError, VarError
from var.hub import infinity as hub_infinity
from var.models import create


# ---- loaders that guessed -------------------------------------------------------------------------------------
def test_a_gpt_pt_of_another_width_needs_its_head_count(tmp_path):
    """gpt_tiny (width 64, 4 heads) loaded from a .pt with a guessed n_head of 1: same shapes, wrong model."""
    from var.errors import CheckpointError
    torch.manual_seed(0)
    gpt = create("gpt_tiny").eval()
    torch.save(gpt.state_dict(), tmp_path / "gpt.pt")
    with pytest.raises(CheckpointError, match="n_head"):
        hub.load_llamagen_gpt(tmp_path / "gpt.pt", grid_size=4)
    assert hub.load_llamagen_gpt(tmp_path / "gpt.pt", grid_size=4, n_head=4).config.n_head == 4


def test_released_gpt_sizes_still_derive_their_heads():
    from var.hub.llamagen import gpt_config_from_state_dict
    for n_layer, n_head, dim in ((12, 12, 768), (24, 16, 1024), (24, 32, 3200)):
        sd = {"tok_embeddings.weight": torch.empty(16384, dim, device="meta"),
              "cls_embedding.embedding_table.weight": torch.empty(1001, dim, device="meta"),
              "output.weight": torch.empty(16384, dim, device="meta"),
              **{f"layers.{i}.feed_forward.w1.weight": torch.empty(8, dim, device="meta") for i in range(n_layer)}}
        assert gpt_config_from_state_dict(sd).n_head == n_head


def _encode(tok, seed=0, size=16):
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return tok.encode(images) if not hasattr(tok, "img_to_idxBl") else tok.img_to_idxBl(images)


def test_a_vq_pt_of_another_width_needs_its_group_count(tmp_path):
    """vq_tiny (ch 16, 8 GroupNorm groups) loaded from a .pt guessed 16 groups: other tokens, no error."""
    torch.manual_seed(0)
    vq = create("vq_tiny").eval()
    torch.save({"model": vq.state_dict()}, tmp_path / "vq.pt")
    with pytest.raises(CheckpointError, match="norm_groups"):
        hub.load_llamagen_vq(tmp_path / "vq.pt", image_size=16)
    loaded = hub.load_llamagen_vq(tmp_path / "vq.pt", image_size=16, norm_groups=8)
    assert torch.equal(_encode(loaded)[0], _encode(vq)[0])


def test_a_multiscale_vqvae_pth_of_another_width_needs_its_group_count(tmp_path):
    """A VQ-VAE of width 64 with 8 groups loaded with the released 32 groups: other tokens, no error."""
    torch.manual_seed(0)
    tok = create("msvq_tiny", ch=64).eval()
    assert tok.config.norm_groups == 8
    torch.save(tok.state_dict(), tmp_path / "tok.pth")
    with pytest.raises(CheckpointError, match="norm_groups"):
        hub.load_var_tokenizer(tmp_path / "tok.pth", patch_nums=tok.patch_nums)
    loaded = hub.load_var_tokenizer(tmp_path / "tok.pth", patch_nums=tok.patch_nums, norm_groups=8)
    assert all(torch.equal(a, b) for a, b in zip(_encode(loaded), _encode(tok)))


def test_a_bsq_vae_pth_of_another_width_needs_its_group_count(tmp_path):
    """A BSQ VAE of width 96 with 8 groups loaded with a guessed 32 groups: other bits, no error."""
    from var.tokenizers.bsq_vae import BSQVAE, BSQVAEConfig
    torch.manual_seed(0)
    vae = BSQVAE(BSQVAEConfig(codebook_dim=6, ch=96, ch_mult=(1, 1), num_res_blocks=1, norm_groups=8)).eval()
    torch.save({"vae": vae.state_dict()}, tmp_path / "vae.pth")
    with pytest.raises(CheckpointError, match="norm_groups"):
        hub.load_bsq_vae(tmp_path / "vae.pth")
    loaded = hub.load_bsq_vae(tmp_path / "vae.pth", norm_groups=8)
    assert loaded.config.norm_groups == 8


def test_a_gpt_whose_grid_does_not_match_the_vq_is_refused(tmp_path):
    """A GPT saved with a 4x4 grid and a VQ saved for 32 px images (8x8 tokens) loaded silently at 16 px."""
    from var.errors import CheckpointMismatchError
    torch.manual_seed(0)
    hub.save_pretrained(create("gpt_tiny").eval(), tmp_path / "gpt")
    hub.save_pretrained(create("vq_tiny", image_size=32).eval(), tmp_path / "vq")
    with pytest.raises(CheckpointMismatchError, match="4x4.*8x8|8x8.*4x4"):
        hub.load_llamagen(tmp_path / "vq", tmp_path / "gpt")


def test_a_gpt_pt_without_image_size_is_refused_unless_its_released_name_says(tmp_path):
    """The token grid is not stored in a .pt: it was 16x16 (256 px) whatever the model, e.g. for c2i_L_384.pt."""
    torch.manual_seed(0)
    vq, gpt = create("vq_tiny").eval(), create("gpt_tiny").eval()
    hub.save_pretrained(vq, tmp_path / "vq")
    torch.save(gpt.state_dict(), tmp_path / "gpt.pt")
    with pytest.raises(CheckpointError, match="image_size"):
        hub.load_llamagen(tmp_path / "vq", tmp_path / "gpt.pt", n_head=4)
    _, loaded = hub.load_llamagen(tmp_path / "vq", tmp_path / "gpt.pt", image_size=16, n_head=4)
    assert loaded.config.grid_size == 4
    from var.hub.llamagen import released_grid_size
    assert (released_grid_size("c2i_L_384.pt"), released_grid_size("c2i_B_256.pt"),
            released_grid_size("t2i_XL_stage2_512.pt"), released_grid_size("my_gpt.pt")) == (24, 16, 32, None)


@pytest.mark.parametrize("size", [0, -16, 18])
def test_image_size_zero_negative_or_off_the_downsample_is_a_config_error(tmp_path, size):
    """``--image-size 0`` meant 256 (``image_size or 256``)."""
    from var.errors import ConfigError
    torch.manual_seed(0)
    hub.save_pretrained(create("gpt_tiny").eval(), tmp_path / "gpt")
    hub.save_pretrained(create("vq_tiny").eval(), tmp_path / "vq")
    with pytest.raises(ConfigError, match="image_size"):
        hub.load_llamagen(tmp_path / "vq", tmp_path / "gpt", image_size=size)
    if size <= 0:
        with pytest.raises(ConfigError, match="image_size"):
            hub.load_llamagen_vq(tmp_path / "vq", image_size=size)
def _poison(sd: dict, key: str, value: float) -> dict:
    sd = {k: v.clone() for k, v in sd.items()}
    sd[key].view(-1)[0] = value
    return sd


def _nan_cases():
    """(name, module, key to poison, loader of a plain file, file name): every family's file loaders."""
    torch.manual_seed(0)
    gpt, vq, var_model = create("gpt_tiny").eval(), create("vq_tiny").eval(), create("var_tiny").eval()
    n_head = gpt.config.n_head
    return [
        ("var", var_model, "head.weight", hub.load_var_transformer, "var.pth"),
        ("gpt", gpt, "layers.1.attention.wqkv.weight",
         lambda p: hub.load_llamagen_gpt(p, grid_size=4, n_head=n_head), "gpt.pt"),
        ("vq", vq, "quantize.embedding.weight", lambda p: hub.load_llamagen_vq(p, image_size=16, norm_groups=8),
         "vq.pt"),
        ("bsq", tiny_vae(), "decoder.conv_in.weight", lambda p: hub.load_bsq_vae(p, norm_groups=4), "vae.pth"),
        ("infinity", tiny_infinity(), "head.weight", hub.load_infinity_transformer, "inf.pth"),
    ]


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("case", range(5))
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, case, value):
    """NaN decoder weights gave all-black PNGs with exit status 0: the loaders now refuse them, naming the tensor."""
    name, module, key, load, file = _nan_cases()[case]
    torch.save(_poison(module.state_dict(), key, value), tmp_path / file)
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")) as info:
        load(tmp_path / file)
    assert type(info.value).__name__ == "NonFiniteWeightsError"
    hub.save_pretrained(module, tmp_path / "dir")  # the saved-directory format goes through the same check
    from safetensors.torch import save_file
    save_file(_poison(module.state_dict(), key, value), str(tmp_path / "dir" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="dir") as info:
        hub.load_pretrained(tmp_path / "dir")
    assert type(info.value).__name__ == "NonFiniteWeightsError"


def test_minus_inf_in_an_attention_mask_buffer_still_loads(tmp_path):
    """VAR's released files carry ``attn_bias_for_masking`` with -inf entries: masked positions, not bad weights."""
    model = create("var_tiny").eval()
    assert torch.isinf(model.attn_bias_for_masking).any()
    torch.save(model.state_dict(), tmp_path / "var.pth")
    hub.load_var_transformer(tmp_path / "var.pth")


# ---- saved directories with a malformed config.json ------------------------------------------------------------
def _saved_gpt(tmp_path):
    import json
    torch.manual_seed(0)
    hub.save_pretrained(create("gpt_tiny").eval(), tmp_path / "gpt")
    path = tmp_path / "gpt" / "config.json"
    return path, json.loads(path.read_text())


@pytest.mark.parametrize("case, expected", [
    ("not json", "config.json.*JSON"),
    ("list", "config.json.*object"),
    ("no config", "config.json.*'config'"),
    ("missing n_head", "config.json.*n_head"),
    ("unknown key", "config.json.*num_heads"),
    ("string n_head", "config.json.*n_head.*'4'"),
    ("bool dim", "config.json.*dim"),
    ("n_head 3", "config.json.*n_head"),
])
def test_a_malformed_config_json_names_the_file_and_the_key(tmp_path, case, expected):
    """A truncated or hand-edited config.json gave a JSONDecodeError/KeyError/TypeError traceback, and a missing
    key silently took the default (``n_head`` 12 for a 4-head model)."""
    import json
    path, meta = _saved_gpt(tmp_path)
    cfg = meta["config"]
    if case == "not json":
        text = path.read_text()[:40]
    elif case == "list":
        text = "[1, 2]"
    else:
        if case == "no config":
            del meta["config"]
        elif case == "missing n_head":
            del cfg["n_head"]
        elif case == "unknown key":
            cfg["num_heads"] = 4
        elif case == "string n_head":
            cfg["n_head"] = "4"
        elif case == "bool dim":
            cfg["dim"] = True
        elif case == "n_head 3":
            cfg["n_head"] = 3
        text = json.dumps(meta)
    path.write_text(text)
    with pytest.raises(CheckpointError, match=expected):
        hub.load_pretrained(path.parent)
    with pytest.raises(CheckpointError, match=expected):
        hub.load_llamagen_gpt(path.parent)


def test_a_malformed_classifier_config_names_the_file(tmp_path):
    from var.eval.classifier import ClassifierConfig, ShapeClassifier, load_classifier, save_classifier
    save_classifier(ShapeClassifier(ClassifierConfig()), tmp_path / "clf")
    (tmp_path / "clf" / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="config.json"):
        load_classifier(tmp_path / "clf")


def test_a_malformed_config_is_one_error_line_on_the_command_line(tmp_path, capsys):
    from var.cli.sample import cli
    path, _ = _saved_gpt(tmp_path)
    hub.save_pretrained(create("vq_tiny").eval(), tmp_path / "vq")
    path.write_text("{not json")
    assert cli(["--family", "ar", "--vq", str(tmp_path / "vq"), "--gpt", str(path.parent),
                "--out", str(tmp_path / "o.png"), "--classes", "1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "config.json" in err and "Traceback" not in err


# ---- files that torch.load(weights_only=True) refuses --------------------------------------------------------
class _RunsCode:
    """Unpickling this calls ``open(marker, "w")``: the file it creates proves the pickle ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _no_unsafe_advice(message: str) -> None:
    assert "weights_only=False" not in message.replace("`", "") and "likely succeed" not in message


def test_random_bytes_are_named_a_corrupt_file_without_the_weights_only_advice(tmp_path):
    (tmp_path / "bad.pth").write_bytes(b"not a pickle at all \x00\x01\x02" * 10)
    with pytest.raises(CheckpointError, match="bad.pth.*not a readable PyTorch checkpoint") as info:
        hub.read_state_dict(tmp_path / "bad.pth")
    _no_unsafe_advice(str(info.value))


def test_a_pickled_code_call_is_refused_by_name_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"model": {"w": torch.ones(2)}, "hook": _RunsCode(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"evil.pt.*io\.open.*safetensors") as info:
        hub.read_state_dict(tmp_path / "evil.pt")
    _no_unsafe_advice(str(info.value))
    assert not marker.exists()


def test_a_training_checkpoint_with_a_pickled_code_call_gets_the_same_message(tmp_path):
    import hashlib
    import io
    from var.train.checkpoint import MAGIC, load_checkpoint
    marker = tmp_path / "ran"
    buf = io.BytesIO()
    torch.save({"hook": _RunsCode(marker)}, buf)
    payload = buf.getvalue()
    (tmp_path / "ckpt_00000001.pt").write_bytes(MAGIC + hashlib.sha256(payload).digest() + payload)
    with pytest.raises(CheckpointError, match=r"ckpt_00000001.pt.*io\.open") as info:
        load_checkpoint(tmp_path / "ckpt_00000001.pt")
    _no_unsafe_advice(str(info.value))
    assert not marker.exists()


# ---- offline wording -----------------------------------------------------------------------------------------
def test_missing_torch_fidelity_names_the_evaluator_flag_that_exists(monkeypatch):
    """The message suggested ``var-eval metrics --offline``, a flag that does not exist (it is --evaluator offline)."""
    import re
    import sys
    from var.cli.eval import build_parser
    from var.eval.metrics import _import_torch_fidelity
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    with pytest.raises(VarError) as info:
        _import_torch_fidelity()
    message = str(info.value)
    metrics = build_parser()._subparsers._group_actions[0].choices["metrics"]
    known = {s for a in metrics._actions for s in a.option_strings}
    assert set(re.findall(r"--[a-z][a-z-]*", message)) <= known and "--evaluator offline" in message


def test_a_released_name_offline_says_it_is_not_cached_and_how_to_get_it(tmp_path, monkeypatch):
    """Offline, the error was huggingface_hub's 'check your connection' with no word on what var can do instead."""
    import sys
    import types

    class LocalEntryNotFoundError(Exception):
        pass

    def offline(repo_id, filename, cache_dir=None):
        raise LocalEntryNotFoundError("cannot find the requested files in the local cache")
    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(hf_hub_download=offline))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as info:
        hub.load_var_transformer("var_d16.pth")
    message = str(info.value)
    assert "not in the local Hugging Face cache" in message and "FoundationVision/var" in message
    assert "local path" in message and "--offline" not in message
