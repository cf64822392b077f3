"""NAR: proximity mask, mixed-logit training loss, the 2n-1-pass neighbouring sampler."""
import pytest
import torch

from var.errors import ConfigError
from var.models import create
from var.models import nar_ctf_presets  # noqa: F401  (registers nar_tiny)
from var.models.gpt import GPT, GPTConfig
from var.models.nar import NAR, grid_distance, mix_training_logits, proximity_mask
from var.train.objectives_nar_ctf import nar_loss
from var.samplers.logits import apply_cfg
from var.samplers.neighbor_nar import diagonal_rows, sample_nar

N_SIDE = 4


def random_heads(model: NAR) -> NAR:
    """Zero-initialised heads would make every logit equal: give them random weights for the tests."""
    with torch.no_grad():
        model.output.weight.normal_(0, 0.5)
        model.medusa_output.weight.normal_(0, 0.5)
    return model.eval()


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return random_heads(create("nar_tiny"))


def test_parameter_overhead_is_one_block_and_one_head():
    c = GPTConfig(dim=64, n_layer=2, n_head=4, multiple_of=32, num_classes=10, vocab_size=64, grid_size=4)
    gpt, nar = GPT(c), NAR(c)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    block = sum(p.numel() for p in nar.layers[-1].parameters())
    assert count(nar) - count(gpt) == block + 64 * 64 + 64  # block + medusa_output + medusa_norm
    assert len(nar.layers) == 3 and nar.new_kv_cache(2).k.__len__() == 3


def test_proximity_mask_structure():
    m = proximity_mask(3)  # [cls, 9 tokens]
    dist = grid_distance(3)
    assert m[0].tolist() == [True] + [False] * 9          # class token: causal
    assert m[1:, 0].all()                                 # every image token sees the class token
    for q in range(9):
        for k in range(9):
            assert bool(m[1 + q, 1 + k]) == bool(dist[k] <= dist[q])
    assert m[1 + 2, 1 + 4] and m[1 + 4, 1 + 2]             # (0,2) <-> (1,1): same diagonal, both directions


@pytest.mark.parametrize("d", [0, 1, 2, 3, 4])
def test_mask_isolates_farther_tokens(model, d):
    """Logits at inputs with distance <= d do not move when tokens at distance > d change (and others do)."""
    n, N = N_SIDE, N_SIDE ** 2
    labels = torch.tensor([1, 7])
    idx = torch.randint(0, 64, (2, N))
    dist = grid_distance(n)
    far = dist > d
    changed = idx.clone()
    changed[:, far] = (idx[:, far] + 1 + torch.randint(0, 62, (2, int(far.sum())))) % 64

    def heads(tokens):
        x = torch.cat((model.class_embed(labels), model.tok_embeddings(tokens[:, :-1])), dim=1)
        return model.forward_heads(x, torch.arange(N), attn_mask=proximity_mask(n, N))

    with torch.no_grad():
        (r0, d0), (r1, d1) = heads(idx), heads(changed)
        m0, m1 = model(labels, idx), model(labels, changed)
    near_inputs = torch.cat((torch.tensor([True]), dist[:-1] <= d))  # output rows: [cls, x_0 .. x_{N-2}]
    torch.testing.assert_close(r0[:, near_inputs], r1[:, near_inputs])
    torch.testing.assert_close(d0[:, near_inputs], d1[:, near_inputs])
    near_targets = dist <= d + 1                                       # predicted from inputs at distance <= d
    torch.testing.assert_close(m0[:, near_targets], m1[:, near_targets])
    if d < 2 * n - 3:  # something farther exists as an input: it must change
        assert not torch.allclose(r0[:, ~near_inputs], r1[:, ~near_inputs])


def test_mixed_logits_assembly():
    n, V = 3, 5
    right = torch.randn(1, n * n, V)
    down = torch.randn(1, n * n, V)
    mixed = mix_training_logits(right, down, n)
    out = lambda t: 1 + t  # noqa: E731  output row of input token t
    torch.testing.assert_close(mixed[0, 0], (right[0, 0] + down[0, 0]) / 2)
    torch.testing.assert_close(mixed[0, 2], right[0, out(1)])                     # (0, 2) <- right of (0, 1)
    torch.testing.assert_close(mixed[0, 3], down[0, out(0)])                      # (1, 0) <- below (0, 0)
    torch.testing.assert_close(mixed[0, 4], (right[0, out(3)] + down[0, out(1)]) / 2)  # (1, 1)
    torch.testing.assert_close(mixed[0, 8], (right[0, out(7)] + down[0, out(5)]) / 2)  # (2, 2)


def test_sampler_does_2n_minus_1_passes(model, monkeypatch):
    calls = []
    original = NAR.forward_heads

    def counting(self, x, positions, kv_cache=None, attn_mask=None):
        calls.append(x.shape[1])
        return original(self, x, positions, kv_cache, attn_mask)

    monkeypatch.setattr(NAR, "forward_heads", counting)
    out = sample_nar(model, create("vq_tiny").eval(), [0, 3, 10], cfg_scale=2.0, top_k=10,
                     generator=torch.Generator().manual_seed(0))
    assert len(calls) == 2 * N_SIDE - 1 == out.stats.forward_passes
    assert calls == [1, 1, 2, 3, 4, 3, 2]                      # class token, then diagonals 0 .. 2n-3
    assert out.tokens.shape == (3, 16) and out.stats.tokens == 16 and out.images.shape == (3, 3, 16, 16)
    assert [len(diagonal_rows(d, 4)) for d in range(7)] == [1, 2, 3, 4, 3, 2, 1]


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_greedy_sampler_matches_teacher_forcing(model, cfg_scale):
    """Every greedily sampled token is the argmax of the training-time mixed logits of the final grid."""
    labels = torch.tensor([2, 5, 9])
    out = sample_nar(model, None, labels, cfg_scale=cfg_scale, top_k=1)
    with torch.no_grad():
        logits = model(labels, out.tokens)
        if cfg_scale != 1.0:
            logits = apply_cfg(logits, model(torch.full_like(labels, 10), out.tokens), cfg_scale)
    assert torch.equal(logits.argmax(-1), out.tokens)


def test_per_sample_generators_and_errors(model):
    gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2)]  # noqa: E731
    batch = sample_nar(model, None, [3, 4], generator=gens())
    single = sample_nar(model, None, [4], generator=[gens()[1]])
    assert torch.equal(batch.tokens[1:], single.tokens)
    with pytest.raises(ConfigError):
        sample_nar(model, None, [3], cfg_scale=0.5)
    with pytest.raises(ConfigError, match="forward_heads"):
        model.prefill(torch.tensor([0]), model.new_kv_cache(1))
    with pytest.raises(ConfigError, match="mask"):
        model.forward_heads(torch.zeros(1, 2, 64), torch.arange(2))


def test_training_reduces_loss():
    torch.manual_seed(0)
    model = create("nar_tiny", token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)
    labels = torch.arange(8) % 10
    idx = torch.randint(0, 64, (8, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = nar_loss(model, labels, idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_trains_with_the_generic_ar_objective(model):
    """NAR's forward returns per-target logits aligned with the tokens, so the trainer's ARObjective applies."""
    from var.train.objectives import ARObjective
    labels, idx = torch.tensor([1, 2]), torch.randint(0, 64, (2, 16))
    loss, _ = ARObjective(create("vq_tiny"), cond_drop_rate=0.0)(model, (idx, labels))
    torch.testing.assert_close(loss, nar_loss(model, labels, idx))


def test_save_and_load_pretrained(model, tmp_path):
    from var.hub import load_pretrained, save_pretrained
    save_pretrained(model, tmp_path / "nar")
    loaded = load_pretrained(tmp_path / "nar")
    assert isinstance(loaded, NAR)
    out_a = sample_nar(model, None, [1, 2], top_k=1)
    out_b = sample_nar(loaded, None, [1, 2], top_k=1)
    assert torch.equal(out_a.tokens, out_b.tokens)
