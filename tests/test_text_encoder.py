"""T5 text encoder: offline tiny random T5, padding/masks, on-disk embeddings and the cache."""
import pytest
import torch

from var.errors import ConfigError, TextEncoderError
from var.models.text_encoder import PromptEmbeddingCache, PromptEmbeddings, TextEncoder


transformers = pytest.importorskip("transformers")
from t2i_helpers import save_tiny_t5, tiny_t5_encoder  # noqa: E402


def test_import_does_not_load_transformers():
    import subprocess
    import sys

    code = "import sys, var.models.text_encoder; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_encode_matches_unpadded_and_zero_pads():
    enc = tiny_t5_encoder()
    prompts = ["a red fox in the snow", "a cat", "big blue square on a green circle"]
    emb = enc.encode(prompts)
    assert emb.prompts == tuple(prompts)
    assert emb.lengths_B.tolist() == [7, 3, 8]  # words + </s>
    assert emb.features_BNC.shape == (3, 8, 16) and emb.features_BNC.dtype == torch.float32
    assert torch.all(emb.features_BNC[~emb.mask_BN] == 0)
    for i, p in enumerate(prompts):  # padding does not change the real tokens' features
        alone = enc.encode([p])
        n = int(emb.lengths_B[i])
        torch.testing.assert_close(emb.features_BNC[i, :n], alone.features_BNC[0, :n], rtol=1e-5, atol=1e-5)
    padded = enc.encode(prompts, pad_to_max_length=True)
    assert padded.features_BNC.shape[1] == enc.max_length
    torch.testing.assert_close(padded.features_BNC[:, :8], emb.features_BNC, rtol=1e-5, atol=1e-5)
    feats, cu = emb.compact()
    assert feats.shape == (18, 16) and cu.tolist() == [0, 7, 10, 18]
    torch.testing.assert_close(feats[7:10], emb.features_BNC[1, :3])


def test_truncation_and_bad_prompts():
    enc = tiny_t5_encoder(max_length=4)
    emb = enc.encode(["a red fox in the snow"])
    assert emb.lengths_B.tolist() == [4]
    with pytest.raises(ConfigError):
        enc.encode("a red fox")
    with pytest.raises(ConfigError):
        enc.encode([])


def test_from_pretrained_local_dir(tmp_path):
    save_tiny_t5(tmp_path / "t5")
    ref = tiny_t5_encoder()
    enc = TextEncoder.from_pretrained(tmp_path / "t5", local_files_only=True, max_length=16)
    prompts = ["a dog on the sea", "lighthouse"]
    torch.testing.assert_close(enc.encode(prompts).features_BNC, ref.encode(prompts).features_BNC)
    with pytest.raises(TextEncoderError):
        TextEncoder.from_pretrained(tmp_path / "nothing_here", local_files_only=True)
    weights = tmp_path / "t5" / "model.safetensors"
    with pytest.raises(TextEncoderError, match="weights file"):
        TextEncoder.from_pretrained(weights, local_files_only=True)


def test_save_load_select_concat(tmp_path):
    emb = tiny_t5_encoder().encode(["a red fox", "a big blue square on the sea", "cat"])
    emb.save(tmp_path / "e.safetensors")
    back = PromptEmbeddings.load(tmp_path / "e.safetensors")
    assert back.prompts == emb.prompts
    assert torch.equal(back.features_BNC, emb.features_BNC) and torch.equal(back.lengths_B, emb.lengths_B)
    sub = emb.select([2, 0])
    assert sub.prompts == ("cat", "a red fox") and sub.features_BNC.shape[1] == 4
    both = PromptEmbeddings.concat([sub, emb.select([1])])
    assert torch.equal(both.features_BNC[2, :8], emb.features_BNC[1, :8])
    with pytest.raises(TextEncoderError):
        PromptEmbeddings.load(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(TextEncoderError, match="not a prompt embeddings file"):
        PromptEmbeddings.load(tmp_path / "other.safetensors")
    with pytest.raises(ConfigError):
        PromptEmbeddings(torch.zeros(2, 3, 4), torch.tensor([1, 5]))


def test_cache_encodes_once(tmp_path):
    enc = tiny_t5_encoder()
    calls = []
    original = enc.encode

    def counting(prompts, **kw):
        calls.append(list(prompts))
        return original(prompts, **kw)

    enc.encode = counting
    cache = PromptEmbeddingCache(tmp_path / "cache", enc)
    first = cache.encode(["a red fox", "a cat", "a red fox"])
    assert calls == [["a red fox", "a cat"]]
    second = cache.encode(["a cat", "a red fox"])
    assert len(calls) == 1
    torch.testing.assert_close(second.features_BNC[1, :4], first.features_BNC[0, :4])
    torch.testing.assert_close(first.features_BNC, original(["a red fox", "a cat", "a red fox"]).features_BNC)
    offline = PromptEmbeddingCache(tmp_path / "cache", encoder_name="tiny-t5", max_length=16)
    assert offline.encode(["a cat"]).prompts == ("a cat",)
    with pytest.raises(TextEncoderError, match="not in the embedding cache"):
        offline.encode(["a dog"])
