"""The released NAR checkpoints' key sets (read from ThisisBillhe/NAR @ 225c1fb,
``NAR-images/autoregressive/models/gpt.py``: LlamaGen's Transformer with ``n_layer + 1`` blocks, the extra one feeding
``medusa_norm`` / ``medusa_output``; ``freqs_cis`` is a plain attribute, not saved) load strictly through
``load_nar``. The spec is written out here from that code, not from var's model."""
import pytest
import torch

from var.errors import CheckpointError, CheckpointMismatchError
from var.hub import load_nar
from var.models.nar import NAR


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


def nar_release_spec(n_layer: int, dim: int, vocab: int = 16384, num_classes: int = 1000) -> dict:
    hidden = find_multiple(int(2 * 4 * dim / 3), 256)  # LlamaGen's FeedForward, multiple_of 256
    spec = {"cls_embedding.embedding_table.weight": (num_classes + 1, dim), "tok_embeddings.weight": (vocab, dim),
            "norm.weight": (dim,), "output.weight": (vocab, dim), "medusa_norm.weight": (dim,),
            "medusa_output.weight": (vocab, dim)}
    for i in range(n_layer + 1):  # + the vertical head's block (medusa_attention_num = 1)
        spec.update({f"layers.{i}.attention.wqkv.weight": (3 * dim, dim), f"layers.{i}.attention.wo.weight": (dim, dim),
                     f"layers.{i}.feed_forward.w1.weight": (hidden, dim),
                     f"layers.{i}.feed_forward.w3.weight": (hidden, dim),
                     f"layers.{i}.feed_forward.w2.weight": (dim, hidden),
                     f"layers.{i}.attention_norm.weight": (dim,), f"layers.{i}.ffn_norm.weight": (dim,)})
    return spec


def write_checkpoint(path, spec, wrap=True):
    sd = {k: torch.empty(shape, device="meta") for k, shape in spec.items()}
    torch.save({"model": sd} if wrap else sd, path)
    return path


@pytest.mark.parametrize("size, n_layer, dim, heads", [("B", 12, 768, 12), ("M", 18, 1024, 16),
                                                       ("L", 24, 1024, 16), ("XL", 36, 1280, 20)])
def test_released_nar_keys_load_strictly(tmp_path, size, n_layer, dim, heads):
    path = write_checkpoint(tmp_path / f"c2i_{size}_384.pt", nar_release_spec(n_layer, dim))
    model = load_nar(path, device="meta")
    assert isinstance(model, NAR) and model.config.n_layer == n_layer and len(model.layers) == n_layer + 1
    assert model.config.n_head == heads and model.config.grid_size == 24 and model.config.dim == dim


def test_a_llamagen_file_or_a_truncated_nar_file_is_refused(tmp_path):
    spec = nar_release_spec(12, 768)
    llamagen = {k: v for k, v in spec.items() if not k.startswith("medusa") and not k.startswith("layers.12.")}
    with pytest.raises(CheckpointError, match="NAR"):
        load_nar(write_checkpoint(tmp_path / "c2i_B_256.pt", llamagen), device="meta")
    del spec["layers.12.ffn_norm.weight"]
    with pytest.raises(CheckpointMismatchError):
        load_nar(write_checkpoint(tmp_path / "broken.pt", spec, wrap=False), device="meta")
