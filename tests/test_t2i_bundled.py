"""Bundled text-to-image pieces: compositional renderer and held-out pairs, caption encoder and its prompt errors,
the training/export loop (smoke), the attribute judge, and ``var-sample --prompt`` with its bad-input errors."""
import warnings

import pytest
import torch

from var import hub
from var.cli.sample import main as sample_main
from var.errors import PromptError
from var.eval.attributes import HEADS, predict_attributes, split_logits, train_attribute_classifier
from var.hub import load_t2i_bundle
from var.models import create
from var.models.caption_encoder import CaptionEncoder, CaptionEncoderConfig
from var.samplers.registry import get_sampler
from var.train import t2i_bundled
from var.train.data import (COLOURS, HELD_OUT_PAIRS, SHAPES, Attributes, CompositionalShapes, all_attributes)


def test_held_out_pairs_cover_every_colour_and_shape_and_are_never_rendered_for_training():
    assert {c for c, _ in HELD_OUT_PAIRS} == set(COLOURS) and {s for _, s in HELD_OUT_PAIRS} == set(SHAPES)
    assert ("pink", "star") not in HELD_OUT_PAIRS  # the CLI's example prompt is a trained pair
    ds = CompositionalShapes(400, seed=3)
    drawn = {ds.attributes(i) for i in range(400)}
    assert not any(a.held_out for a in drawn) and len(drawn) > 150
    held = CompositionalShapes(50, seed=3, held_out=True)
    assert all(held.attributes(i).held_out for i in range(50))
    assert len(all_attributes()) == len(all_attributes(False)) + len(all_attributes(True)) == 8 * 7 * 4


def test_captions_round_trip():
    for a in all_attributes():
        assert Attributes.parse(a.caption) == a
    assert Attributes("teal", "square", "hstripes").caption == "a teal square with horizontal stripes"
    assert Attributes("pink", "star").caption == "a pink star"


def encoder():
    torch.manual_seed(0)
    return CaptionEncoder(CaptionEncoderConfig(vocab=t2i_bundled.caption_vocabulary(), dim=16, n_layer=1,
                                               n_head=4, max_words=7)).eval()


def test_caption_encoder_condition_and_prompt_errors(tmp_path):
    enc = encoder()
    cond = enc.condition(["a pink star", "a teal square with horizontal stripes"])
    assert cond.features_BTC.shape == (2, 8, 16) and cond.mask_BT.sum(1).tolist() == [4, 7]
    assert not cond.mask_BT[0, :4].any()  # left padded
    with pytest.raises(PromptError, match="empty prompt"):
        enc.condition(["  "])
    with pytest.raises(PromptError, match="unknown word 'gold'"):
        enc.condition(["a gold star"])
    long = "a pink star with horizontal stripes with checkers"
    with pytest.raises(PromptError, match="8 words; this model reads at most 7"):
        enc.condition([long])
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert enc.condition([long], truncate=True).mask_BT.sum() == 8
    assert "truncated" in str(w[0].message)
    hub.save_pretrained(enc, tmp_path / "enc")
    again = hub.load_pretrained(tmp_path / "enc")
    torch.testing.assert_close(again.condition(["a red ring"]).features_BTC, enc.condition(["a red ring"]).features_BTC)


@pytest.fixture(scope="module")
def smoke_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("t2i")
    t2i_bundled.main(["--out-dir", str(out / "run"), "--export-dir", str(out / "export"), "--num-images", "32",
                      "--steps", "3", "--batch-size", "4", "--dim", "32", "--n-layer", "1", "--n-head", "2",
                      "--text-dim", "16", "--log-every", "1", "--export-every", "2"])
    return out / "export"


def test_training_exports_a_loadable_bundle_that_every_sampler_runs(smoke_bundle):
    vq, gpt, enc = load_t2i_bundle(smoke_bundle)
    assert gpt.config.caption_dim == enc.config.dim == 16 and gpt.config.caption_len == 8
    cond = enc.condition(["a pink star", "a red ring with checkers"])
    for name in ("next_token", "sjd", "mcsjd", "lantern", "gsd", "zipar"):
        knobs = {"k": 8} if name == "lantern" else {}
        out = get_sampler(name)({"model": gpt, "tokenizer": vq}, cond, cfg_scale=2.0,
                                generator=torch.Generator().manual_seed(0), **knobs)
        assert out.images.shape == (2, 3, 32, 32), name


def test_var_sample_prompts_and_bad_input(smoke_bundle, tmp_path, capsys):
    from var.cli.sample import cli
    src = ["--vq", str(smoke_bundle / "tokenizer"), "--gpt", str(smoke_bundle / "transformer"),
           "--text-encoder", str(smoke_bundle / "text_encoder"), "--out", str(tmp_path / "g.png")]
    assert sample_main(src + ["--prompt", "a pink star", "--prompt", "a blue disc", "--sampler", "sjd"]) == 0
    assert (tmp_path / "g.png").exists()
    prompts = tmp_path / "p.txt"
    prompts.write_text("a pink star\na red ring\n")
    assert sample_main(src + ["--prompts-file", str(prompts)]) == 0
    prompts.write_text("a pink star\n\na red ring\n")
    bad = [(["--prompt", ""], "empty prompt"), (["--prompts-file", str(prompts)], "p.txt:2: empty line"),
           (["--prompt", "a pink star with horizontal stripes with checkers"], "at most 7"),
           (["--prompt", "a gold star"], "unknown word")]
    for args, message in bad:
        capsys.readouterr()
        assert cli(src + args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    c2i = tmp_path / "c2i"
    hub.save_pretrained(create("gpt_tiny", vocab_size=256, grid_size=8), c2i)
    assert cli(["--vq", str(smoke_bundle / "tokenizer"), "--gpt", str(c2i), "--prompt", "a pink star"]) == 2
    assert "class-conditional" in capsys.readouterr().err


def test_attribute_classifier_heads():
    clf = train_attribute_classifier(CompositionalShapes(64, seed=0, held_out=None), steps=2, batch_size=8)
    images, attrs = CompositionalShapes(8, seed=1).tensors()
    heads = split_logits(clf(images))
    assert [h.shape[1] for h in heads] == list(HEADS)
    pred = predict_attributes(clf, images)
    assert pred.shape == (8, 3) and (pred[:, 0] < len(COLOURS)).all() and (pred[:, 1] < len(SHAPES)).all()


def test_var_sample_prompt_with_a_t5_text_encoder(tmp_path):
    """The released-model path: a LlamaGen-style GPTT2I with T5 features (a tiny random offline T5 here)."""
    pytest.importorskip("transformers")
    from t2i_helpers import save_tiny_t5
    t5 = save_tiny_t5(tmp_path / "t5", d_model=16)
    hub.save_pretrained(create("gpt_tiny_t2i"), tmp_path / "gpt")
    hub.save_pretrained(create("vq_tiny"), tmp_path / "vq")
    base = ["--vq", str(tmp_path / "vq"), "--gpt", str(tmp_path / "gpt"), "--text-encoder", str(t5),
            "--out", str(tmp_path / "g.png")]
    assert sample_main(base + ["--prompt", "a red fox in the snow", "--sampler", "mcsjd"]) == 0
    with pytest.warns(UserWarning, match="truncated to 8"):
        assert sample_main(base + ["--prompt", "a big red fox in the snow on the sea"]) == 0


def test_installed_bundle_answers_a_prompt_with_no_other_argument(tmp_path, monkeypatch):
    from var.assets import bundled_t2i_dir
    assert bundled_t2i_dir() is not None, "var/assets/t2i_bundled is part of the package"
    monkeypatch.chdir(tmp_path)
    assert sample_main(["--prompt", "a pink star"]) == 0
    assert (tmp_path / "samples.png").exists()
