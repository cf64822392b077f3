"""GPU tier: the compiled ragged-attention kernel on CUDA against an fp64 reference (``pytest -m gpu``).

Bound (design notes): the kernel's max error is within 2x of PyTorch's own error at that precision on the same
device (PyTorch path = SDPA over the gathered cache). PyTorch's error is floored at two ulps of the largest output
(the output rounding plus the ulp-level reordering of an online softmax over several key blocks), since on the CPU
dry run PyTorch's math path can be more exact than any blockwise kernel.
"""
import pytest
import torch

from var.kernels import CompressedKVCache
from var.kernels.compaction import segment_starts
from var.kernels.ragged_attention import ragged_attention, ragged_attention_reference

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _case(device, B, H, n, D, lengths, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lengths, dtype=torch.int32)
    T = int(lens.sum())
    q, kc, vc = (torch.randn(B, H, n, D, generator=g) for _ in range(3))
    kp, vp = torch.randn(T, D, generator=g), torch.randn(T, D, generator=g)
    start = segment_starts(lens)
    return [t.to(device=device, dtype=dtype) for t in (q, kp, vp)] + [start.to(device), lens.to(device)] + \
        [kc.to(device=device, dtype=dtype), vc.to(device=device, dtype=dtype)]


def _reference(q, kp, vp, start, lens, kc, vc, scale):
    # fp64 on the CPU, from the same rounded inputs (q rounded to K's dtype, as both paths do)
    q = q.to(kp.dtype)
    return ragged_attention_reference(*(t.cpu().double() for t in (q, kp, vp)), start.cpu(), lens.cpu(),
                                      kc.cpu().double(), vc.cpu().double(), scale=scale)


def _err(out, ref):
    return (out.cpu().double() - ref).abs().max().item()


def _bound(torch_err, ref, dtype):
    return 2 * max(torch_err, 2 * torch.finfo(dtype).eps * ref.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [64, 80, 128])
@pytest.mark.parametrize("n", [1, 16, 100])
def test_compiled_kernel_matches_fp64(device, dtype, D, n):
    """Ragged lengths including 0 and 1 (and longer than one block), poisoned outputs, three dtypes, three head
    dims, query counts of VAR's early, middle and late scales."""
    B, H = 2, 3
    lengths = [0, 1, 37, 130, 1, 0]
    q, kp, vp, start, lens, kc, vc = _case(device, B, H, n, D, lengths, dtype)
    scale = D ** -0.5
    ref = _reference(q, kp, vp, start, lens, kc, vc, scale)
    torch_err = _err(ragged_attention(q, kp, vp, start, lens, kc, vc, scale=scale, backend="torch"), ref)
    poisoned = torch.full((B, H, n, D), float("nan"), dtype=dtype, device=device)
    out = ragged_attention(q, kp, vp, start, lens, kc, vc, scale=scale, backend="triton", out=poisoned)
    assert out.data_ptr() == poisoned.data_ptr() and torch.isfinite(out).all(), "kernel left poisoned outputs"
    assert _err(out, ref) <= _bound(torch_err, ref, dtype), (_err(out, ref), torch_err)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fp32_query_under_autocast_reads_low_precision_pools(device, dtype):
    """What the samplers do: under autocast VAR's L2-normalised q is fp32 while the pools are bf16/fp16; the kernel
    rounds q to the pool dtype (no fp32 copy of the pools) and returns V's dtype."""
    q, kp, vp, start, lens, kc, vc = _case(device, 2, 4, 64, 64, [0, 1, 300, 17, 64, 5, 2, 90], dtype, seed=2)
    q = q.float()
    ref = _reference(q, kp, vp, start, lens, kc, vc, 0.125)
    with torch.autocast(device.type, dtype=dtype):
        torch_err = _err(ragged_attention(q, kp, vp, start, lens, kc, vc, scale=0.125, backend="torch"), ref)
        out = ragged_attention(q, kp, vp, start, lens, kc, vc, scale=0.125, backend="triton")
    assert out.dtype == dtype
    assert _err(out, ref) <= _bound(torch_err, ref, dtype)


def test_strided_out_and_inputs(device):
    q, kp, vp, start, lens, kc, vc = _case(device, 2, 3, 40, 64, [0, 5, 37, 1, 16, 100], torch.bfloat16)
    expected = ragged_attention(q, kp, vp, start, lens, kc, vc, scale=0.3, backend="triton")
    q_s = q.transpose(-1, -2).contiguous().transpose(-1, -2)
    out = torch.full((2, 64, 3, 40), float("nan"), dtype=torch.bfloat16, device=device).permute(0, 2, 3, 1)
    got = ragged_attention(q_s, kp, vp, start, lens, kc, vc, scale=0.3, backend="triton", out=out)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-2)  # another specialisation: allow ~1 bf16 ulp


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compressed_cache_triton_equals_torch_in_a_model_pass(device, dtype):
    """The kernel inside CompressedKVCache (keep everything) vs the PyTorch path, bf16 pools, VAR-like scales."""
    torch.manual_seed(0)
    L, B, H, D = 2, 3, 4, 64
    caches = {b: CompressedKVCache(L, B, H, D, capacity=1 + 4 + 9 + 16, dtype=dtype, device=device, backend=b)
              for b in ("torch", "triton")}
    for pn in (1, 2, 3, 4):
        q, k, v = (torch.randn(B, H, pn * pn, D, device=device) for _ in range(3))
        outs = {}
        for name, cache in caches.items():
            outs[name] = torch.stack([cache.attend(layer, q, k, v.to(dtype), scale=0.125) for layer in range(L)])
            cache.advance(pn * pn)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(outs["triton"].float(), outs["torch"].float(), rtol=tol, atol=tol)
