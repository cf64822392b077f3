"""var.hub: one state-dict reader and unwrap order for every family; released names resolved through huggingface_hub
(replaced here by a fake module: no test touches the network)."""
import sys
import types

import pytest
import torch

from var import hub
from var.errors import CheckpointError, MissingDependencyError
from var.models import create


def _shifted(sd, delta):
    return {k: v + delta if v.is_floating_point() else v.clone() for k, v in sd.items()}


@pytest.mark.parametrize("family", ["var", "llamagen"])
def test_one_unwrap_order_for_both_families(tmp_path, family):
    """A training file with raw and EMA weights yields the EMA weights through either loader; key= picks raw."""
    torch.manual_seed(0)
    model = create("var_tiny" if family == "var" else "gpt_tiny").eval()
    raw, ema = model.state_dict(), _shifted(model.state_dict(), 1.0)
    torch.save({"model": raw, "ema": ema, "steps": 3}, tmp_path / "train.pt")
    load = hub.load_var_transformer if family == "var" else hub.load_llamagen_gpt
    kwargs = {} if family == "var" else {"grid_size": model.config.grid_size, "n_head": model.config.n_head}
    for key, expected in ((None, ema), ("ema", ema), ("model", raw)):
        loaded = load(tmp_path / "train.pt", key=key, **kwargs).state_dict()
        assert all(torch.equal(loaded[k], expected[k]) for k in expected), key
    assert hub.UNWRAP_ORDER[0] == "ema"


def test_unwrap_skips_absent_ema_and_names_a_missing_key(tmp_path):
    sd = {"w": torch.ones(2)}
    torch.save({"model": sd, "ema": None, "args": 1}, tmp_path / "a.pt")  # var-train's layout when EMA is off
    assert torch.equal(hub.read_state_dict(tmp_path / "a.pt")["w"], sd["w"])
    with pytest.raises(CheckpointError, match="no entry 'module'"):
        hub.read_state_dict(tmp_path / "a.pt", key="module")


def test_released_names_download_through_huggingface_hub(tmp_path, monkeypatch):
    """A bare released name goes to hf_hub_download with the family's repo; a local path never does."""
    calls = []
    vq, gpt = create("vq_tiny").eval(), create("gpt_tiny").eval()
    files = {"vq_ds16_c2i.pt": vq.state_dict(), "c2i_B_256.pt": gpt.state_dict()}

    def fake_download(repo_id, filename, cache_dir=None):
        calls.append((repo_id, filename))
        path = tmp_path / "hf" / filename
        path.parent.mkdir(exist_ok=True)
        torch.save({"model": files[filename]}, path)
        return str(path)

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(hf_hub_download=fake_download))
    monkeypatch.chdir(tmp_path)  # the bare names are not local files here
    vq2, gpt2 = hub.load_llamagen("vq_ds16_c2i.pt", "c2i_B_256.pt", image_size=16, n_head=gpt.config.n_head,
                                 norm_groups=vq.config.norm_groups)
    assert calls == [("FoundationVision/LlamaGen", "vq_ds16_c2i.pt"), ("FoundationVision/LlamaGen", "c2i_B_256.pt")]
    assert all(torch.equal(gpt2.state_dict()[k], v) for k, v in gpt.state_dict().items())
    assert hub.resolve_var_checkpoint(tmp_path / "hf" / "c2i_B_256.pt") == tmp_path / "hf" / "c2i_B_256.pt"
    assert len(calls) == 2
    monkeypatch.setattr(sys.modules["huggingface_hub"], "hf_hub_download",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(CheckpointError, match="could not be downloaded .*FoundationVision/var.*offline"):
        hub.load_var_transformer("var_d16.pth")


def test_missing_huggingface_hub_is_a_named_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import raises ImportError
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MissingDependencyError, match=r"var-toolkit\[hub\]"):
        hub.load_var_transformer("var_d16.pth")
    with pytest.raises(CheckpointError, match="checkpoint not found"):  # not a released name: no download tried
        hub.load_llamagen_gpt("my_gpt.pt")
