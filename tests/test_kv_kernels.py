"""Ragged attention (PyTorch path and Triton kernel under TRITON_INTERPRET=1) vs an fp64 reference; compaction."""
import os

import pytest
import torch

from var.errors import ConfigError
from var.kernels._backend import resolve_backend
from var.kernels.compaction import gather_rows, kept_rows, segment_starts
from var.kernels.ragged_attention import ragged_attention, ragged_attention_reference


def _case(B, H, n, D, lengths, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lengths, dtype=torch.int32)
    T = int(lens.sum())
    q, kc, vc = (torch.randn(B, H, n, D, generator=g) for _ in range(3))
    kp, vp = torch.randn(T, D, generator=g), torch.randn(T, D, generator=g)
    return [t.to(dtype) for t in (q, kp, vp)] + [segment_starts(lens), lens] + [kc.to(dtype), vc.to(dtype)]


def _max_err(out, ref):
    return (out.double() - ref).abs().max().item()


def test_backend_dispatch(monkeypatch):
    monkeypatch.delenv("VAR_KERNELS", raising=False)
    assert resolve_backend("torch", "cpu") == "torch"
    monkeypatch.setenv("VAR_KERNELS", "torch")
    assert resolve_backend(None, "cpu") == "torch"
    monkeypatch.setenv("VAR_KERNELS", "cuda-please")
    with pytest.raises(ConfigError, match="cuda-please"):
        resolve_backend(None, "cpu")
    monkeypatch.setenv("VAR_KERNELS", "auto")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert resolve_backend(None, "cpu") == "torch"
    with pytest.raises(ConfigError, match="TRITON_INTERPRET"):
        resolve_backend("triton", "cpu")


@pytest.mark.parametrize("B,H,n,D,lengths", [
    (1, 3, 9, 16, [0, 5, 37]),            # zero-length head, lengths not multiples of the block
    (2, 2, 5, 32, [3, 0, 17, 1]),
    (1, 2, 4, 64, [0, 0]),                # nothing kept at all
    (1, 1, 1, 16, [33]),                  # a single query
])
def test_triton_kernel_matches_fp64_reference(B, H, n, D, lengths):
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU run needs TRITON_INTERPRET=1 (set by conftest)")
    q, kp, vp, start, lens, kc, vc = _case(B, H, n, D, lengths)
    scale = 0.7
    ref = ragged_attention_reference(q.double(), kp.double(), vp.double(), start, lens, kc.double(), vc.double(),
                                     scale=scale)
    torch_err = _max_err(ragged_attention(q, kp, vp, start, lens, kc, vc, scale=scale, backend="torch"), ref)
    poisoned = torch.full((B, H, n, D), float("nan"))
    out = ragged_attention(q, kp, vp, start, lens, kc, vc, scale=scale, backend="triton", out=poisoned)
    assert out.data_ptr() == poisoned.data_ptr()
    assert torch.isfinite(out).all(), "kernel left poisoned outputs"
    assert _max_err(out, ref) <= 2 * max(torch_err, 1e-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_kernel_low_precision(dtype):
    """Half precisions (the interpreter computes bf16 products in fp32: its bf16 tl.dot is not usable)."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU run needs TRITON_INTERPRET=1 (set by conftest)")
    q, kp, vp, start, lens, kc, vc = _case(1, 2, 9, 32, [0, 21], dtype=dtype, seed=1)
    ref = ragged_attention_reference(q.double(), kp.double(), vp.double(), start, lens, kc.double(), vc.double(),
                                     scale=0.3)
    torch_err = _max_err(ragged_attention(q, kp, vp, start, lens, kc, vc, scale=0.3, backend="torch"), ref)
    poisoned = torch.full((1, 2, 9, 32), float("nan"), dtype=dtype)
    out = ragged_attention(q, kp, vp, start, lens, kc, vc, scale=0.3, backend="triton", out=poisoned)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert _max_err(out, ref) <= 2 * torch_err


def test_torch_path_ragged_and_uniform_match_reference():
    q, kp, vp, start, lens, kc, vc = _case(2, 3, 7, 16, [4, 0, 9, 1, 12, 2])
    ref = ragged_attention_reference(q.double(), kp.double(), vp.double(), start, lens, kc.double(), vc.double(),
                                     scale=0.5)
    out = ragged_attention(q, kp, vp, start, lens, kc, vc, scale=0.5, backend="torch")
    assert _max_err(out, ref) < 1e-5
    q, kp, vp, start, lens, kc, vc = _case(2, 2, 3, 16, [6, 6, 6, 6])
    ref = ragged_attention_reference(q, kp, vp, start, lens, kc, vc, scale=0.5)
    fast = ragged_attention(q, kp, vp, start, lens, kc, vc, scale=0.5, backend="torch", uniform_len=6)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)


def test_mixed_dtypes_follow_full_cache_convention():
    """fp32 K with low-precision q/V: computed in fp32, like KVCache."""
    q, kp, vp, start, lens, kc, vc = _case(1, 2, 4, 16, [3, 5])
    ref = ragged_attention_reference(q.double(), kp.double(), vp.bfloat16().double(), start, lens, kc.double(),
                                     vc.bfloat16().double(), scale=1.0)
    out = ragged_attention(q.bfloat16(), kp, vp.bfloat16(), start, lens, kc, vc.bfloat16(), scale=1.0,
                           backend="torch")
    assert out.dtype == torch.float32
    assert _max_err(out, ref) < 2e-2


def test_shape_errors_are_named():
    q, kp, vp, start, lens, kc, vc = _case(1, 2, 4, 16, [3, 5])
    with pytest.raises(ConfigError, match="B\\*H"):
        ragged_attention(q, kp, vp, start[:1], lens[:1], kc, vc, scale=1.0, backend="torch")


def test_compaction_gathers_kept_tokens_in_order():
    B, H, n, D = 1, 3, 4, 2
    lens = torch.tensor([2, 0, 3], dtype=torch.int32)
    pool = torch.arange(5 * D, dtype=torch.float32).view(5, D)
    cur = 100 + torch.arange(B * H * n * D, dtype=torch.float32).view(B, H, n, D)
    keep = torch.zeros(B, H, 3 + n, dtype=torch.bool)
    keep[0, 0, [1, 3]] = True          # prefix row 1 and current token 0 of head 0
    keep[0, 1, [0, 6]] = True          # prefix slot 0 is padding for head 1 (length 0): ignored
    keep[0, 2, [0, 2, 4, 5]] = True
    rows, new_len, cand = kept_rows(keep, segment_starts(lens), lens, 3, pool.shape[0])
    assert new_len.tolist() == [2, 1, 4]
    out = gather_rows(pool, cur, rows)
    expected = [pool[1], cur[0, 0, 0], cur[0, 1, 3], pool[2], pool[4], cur[0, 2, 1], cur[0, 2, 2]]
    torch.testing.assert_close(out, torch.stack(expected), rtol=0, atol=0)
    assert cand.tolist() == [1, 3, 6, 0, 2, 4, 5]
