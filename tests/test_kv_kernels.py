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


def _triton_available():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU run needs TRITON_INTERPRET=1 (set by conftest)")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_pools_are_used_in_their_stored_dtype(backend):
    """fp32 query (what autocast hands over) with bf16 pools: q is rounded to bf16, no fp32 copy of the pools,
    the result has V's dtype; fp32 K with bf16 V (KVCache's k_dtype) also works."""
    if backend == "triton":
        _triton_available()
    q, kp, vp, start, lens, kc, vc = _case(1, 2, 4, 16, [3, 5])
    kp, vp, kc, vc = (t.bfloat16() for t in (kp, vp, kc, vc))
    ref = ragged_attention_reference(q.bfloat16().double(), kp.double(), vp.double(), start, lens, kc.double(),
                                     vc.double(), scale=1.0)
    torch_err = _max_err(ragged_attention(q, kp, vp, start, lens, kc, vc, scale=1.0, backend="torch"), ref)
    out = ragged_attention(q, kp, vp, start, lens, kc, vc, scale=1.0, backend=backend)
    # the kernel rounds the softmax weights to bf16 before P.V (as FlashAttention does on CUDA); PyTorch's CPU SDPA
    # keeps them in fp32, so its error can be below one output ulp: allow 2x of whichever is larger
    ulp = 2.0 ** -8 * ref.abs().max().item()
    assert out.dtype == torch.bfloat16 and _max_err(out, ref) <= 2 * max(torch_err, ulp)
    kp32, kc32 = kp.float(), kc.float()  # fp32 K, bf16 V
    ref = ragged_attention_reference(q.double(), kp32.double(), vp.double(), start, lens, kc32.double(), vc.double(),
                                     scale=1.0)
    out = ragged_attention(q.bfloat16(), kp32, vp, start, lens, kc32, vc, scale=1.0, backend=backend)
    assert out.dtype == torch.bfloat16 and _max_err(out, ref) < 2e-2


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mismatched_pool_dtypes_raise_on_both_paths(backend):
    if backend == "triton":
        _triton_available()
    q, kp, vp, start, lens, kc, vc = _case(1, 2, 4, 16, [3, 5])
    with pytest.raises(ConfigError, match="k_pool torch.bfloat16 vs k_cur torch.float32"):
        ragged_attention(q, kp.bfloat16(), vp, start, lens, kc, vc, scale=1.0, backend=backend)
    with pytest.raises(ConfigError, match="v_pool torch.float32 vs v_cur torch.float16"):
        ragged_attention(q, kp, vp, start, lens, kc, vc.half(), scale=1.0, backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_views_in_and_out(backend, dtype):
    """Transposed / non-unit-stride q, K, V and out views give the same result as contiguous tensors."""
    if backend == "triton":
        _triton_available()
    B, H, n, D = 2, 3, 20, 16
    q, kp, vp, start, lens, kc, vc = _case(B, H, n, D, [0, 5, 37, 1, 16, 18], dtype=dtype)
    expected = ragged_attention(q, kp, vp, start, lens, kc, vc, scale=0.4, backend="torch")

    def strided(t):  # same values, last dim no longer unit-stride
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)

    q_s, kc_s, vc_s = (strided(t) for t in (q, kc, vc))
    kp_s, vp_s = strided(kp), strided(vp)
    outs = [torch.full((B, n, H, D), float("nan"), dtype=dtype).transpose(1, 2),   # [B, n, H, D] buffer
            torch.full((B, H, D, n), float("nan"), dtype=dtype).transpose(2, 3)]   # D not unit-stride
    for out in outs:
        got = ragged_attention(q_s, kp_s, vp_s, start, lens, kc_s, vc_s, scale=0.4, backend=backend, out=out)
        assert got.data_ptr() == out.data_ptr()
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


def test_many_heads_are_folded_into_one_grid_axis():
    """The launch grid is 1-D (B*H*query blocks; CUDA's second axis stops at 65,535) and each program finds its
    (head, query block): many heads and several query blocks per head against the reference."""
    _triton_available()
    from var.kernels._ragged_attention_triton import INTERPRETER_BLOCKS, launch_grid

    assert launch_grid(1100 * 2, 30, 256, 64) == (1100 * 2 * 30 * 4,)  # VAR-d30, 1,100 images with CFG: one axis
    B, H, n, D = 2, 3, 2 * INTERPRETER_BLOCKS[0] + 3, 16
    lengths = [(7 * i) % 23 for i in range(B * H)]
    q, kp, vp, start, lens, kc, vc = _case(B, H, n, D, lengths, seed=3)
    ref = ragged_attention_reference(q.double(), kp.double(), vp.double(), start, lens, kc.double(), vc.double(),
                                     scale=0.6)
    out = ragged_attention(q, kp, vp, start, lens, kc, vc, scale=0.6, backend="triton")
    assert _max_err(out, ref) < 1e-5


def test_autotune_configs_fit_shared_memory():
    """No candidate that could overflow shared memory is tuned over (head dim 128 in fp32 included)."""
    pytest.importorskip("triton")
    from var.kernels._ragged_attention_triton import SMEM_BUDGET, configs_that_fit, shared_memory_bytes

    for block_d in (16, 32, 64, 128, 256):
        for size in (2, 4):
            configs = configs_that_fit(block_d, size, size)
            assert configs
            for m, n, _, stages in configs:
                assert shared_memory_bytes(m, n, block_d, stages, size, size) <= SMEM_BUDGET or block_d == 256
    assert all(n <= 32 or stages == 1 for m, n, _, stages in configs_that_fit(128, 4, 4))
    assert any(m >= 64 and n >= 64 for m, n, _, _ in configs_that_fit(128, 2, 2))  # bf16: big tiles stay


@pytest.mark.slow
def test_kernel_compiles_for_sm90_within_the_shared_memory_estimate():
    """Without a GPU: Triton compiles the kernel for an H100/H200 (sm_90, its bundled ptxas) for every
    configuration that fits, in fp32 at head dim 128 and bf16 at 64; the compiled shared memory stays within
    the estimate. Run in a subprocess: this process's Triton is in interpreter mode."""
    pytest.importorskip("triton")
    import subprocess
    import sys
    from pathlib import Path

    code = """
import os, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from var.kernels import _ragged_attention_triton as m
fn = m._ragged_attention_fwd
const = ("HEAD_DIM", "BLOCK_M", "BLOCK_N", "BLOCK_D", "EMULATE_DOT")
for dt, D, size in (("fp32", 128, 4), ("bf16", 64, 2)):
    sig = {n: "constexpr" if n in const else "*i32" if n.startswith("SEG") else "fp32" if n == "qk_scale"
           else f"*{dt}" if n in ("Q", "KP", "VP", "KC", "VC", "O") else "i32" for n in fn.arg_names}
    bd = max(16, triton.next_power_of_2(D))
    for bm, bn, w, st in m.configs_that_fit(bd, size, size):
        src = ASTSource(fn, sig, constexprs=dict(HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, EMULATE_DOT=False))
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=w, num_stages=st))
        assert k.metadata.shared <= m.shared_memory_bytes(bm, bn, bd, st, size, size), (dt, bm, bn, st)
print("ok")
"""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(root), TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr


def test_auto_falls_back_to_torch_with_one_warning(monkeypatch):
    """A kernel that fails to compile: auto warns once and uses PyTorch from then on; explicit triton raises."""
    _triton_available()
    import var.kernels._backend as backend_mod
    import var.kernels._ragged_attention_triton as kernel_mod

    monkeypatch.setattr(backend_mod, "_disabled", [])
    monkeypatch.delenv("VAR_KERNELS", raising=False)

    def broken(*args, **kwargs):
        raise RuntimeError("simulated compile error")

    monkeypatch.setattr(kernel_mod, "ragged_attention_triton", broken)
    q, kp, vp, start, lens, kc, vc = _case(1, 2, 4, 16, [3, 5])
    expected = ragged_attention(q, kp, vp, start, lens, kc, vc, scale=1.0, backend="torch")
    with pytest.raises(RuntimeError, match="simulated"):
        ragged_attention(q, kp, vp, start, lens, kc, vc, scale=1.0, backend="triton")
    with pytest.warns(RuntimeWarning, match="simulated compile error") as record:
        out = ragged_attention(q, kp, vp, start, lens, kc, vc, scale=1.0)
        out2 = ragged_attention(q, kp, vp, start, lens, kc, vc, scale=1.0)
    assert len(record) == 1
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(out2, expected, rtol=0, atol=0)
    assert resolve_backend(None, "cpu") == "torch" and resolve_backend("triton", "cpu") == "triton"
    monkeypatch.setenv("VAR_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="simulated"):
        ragged_attention(q, kp, vp, start, lens, kc, vc, scale=1.0)


def test_auto_without_triton_on_cuda_warns_once(monkeypatch):
    import var.kernels._backend as backend_mod

    monkeypatch.setattr(backend_mod, "_disabled", [])
    monkeypatch.setattr(backend_mod, "triton_module", lambda: None)
    monkeypatch.delenv("VAR_KERNELS", raising=False)
    with pytest.warns(RuntimeWarning, match="cannot be imported") as record:
        assert resolve_backend(None, "cuda") == "torch" and resolve_backend("auto", "cuda") == "torch"
    assert len(record) == 1
    with pytest.raises(ConfigError, match="cannot be imported"):
        resolve_backend("triton", "cuda")


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
    rows, new_len, cand, min_max = kept_rows(keep, segment_starts(lens), lens, 3, pool.shape[0])
    assert new_len.tolist() == [2, 1, 4] and min_max == (1, 4)
    out = gather_rows(pool, cur, rows)
    expected = [pool[1], cur[0, 0, 0], cur[0, 1, 3], pool[2], pool[4], cur[0, 2, 1], cur[0, 2, 2]]
    torch.testing.assert_close(out, torch.stack(expected), rtol=0, atol=0)
    assert cand.tolist() == [1, 3, 6, 0, 2, 4, 5]


def test_every_cache_reports_allocated_and_live_bytes_the_same_way():
    """Identical tokens in the full cache and in a compressed cache that keeps everything: equal live K/V bytes;
    allocated bytes are the full cache's preallocated buffers and the compressed cache's pools + index."""
    from var.kernels import CompressedKVCache, KVCache

    L, B, H, D, cap = 2, 2, 3, 8, 10
    full = KVCache(L, B, H, cap, D, dtype=torch.bfloat16, k_dtype=torch.float32)
    comp = CompressedKVCache(L, B, H, D, capacity=cap, dtype=torch.bfloat16, k_dtype=torch.float32,
                             keep_last_scale=True, backend="torch")
    token_bytes = L * B * H * D * (4 + 2)
    assert (full.nbytes(), full.live_nbytes(), comp.nbytes(), comp.live_nbytes()) == (token_bytes * cap, 0, 2 * L * B * H * 4, 0)
    g = torch.Generator().manual_seed(0)
    for n in (1, 4, 5):
        q, k, v = (torch.randn(B, H, n, D, generator=g) for _ in range(3))
        for cache in (full, comp):
            for layer in range(L):
                cache.attend(layer, q, k, v.bfloat16(), scale=0.5)
            cache.advance(n)
        assert full.live_nbytes() == comp.live_nbytes() == comp.kv_nbytes() == token_bytes * full.length
    assert full.nbytes() == full.peak_nbytes() == token_bytes * cap
    assert comp.nbytes() == comp.kv_nbytes() + L * (B * H * 4 * 2 + cap * B * H * 4)  # seg_start/len + positions
    full.truncate(5)
    comp.truncate(5)
    assert full.live_nbytes() == comp.live_nbytes() == token_bytes * 5
    assert full.peak_live_nbytes() == comp.peak_live_nbytes() == token_bytes * 10


def test_sampler_stats_carry_both_byte_peaks():
    from helpers import tiny_var_pair
    from var.kernels import StreamingLLM
    from var.samplers import sample_next_scale

    tok, model = tiny_var_pair()
    full = sample_next_scale(model, tok, [1, 2], generator=torch.Generator().manual_seed(0))
    cfg = model.config
    token_bytes = 2 * cfg.depth * 4 * cfg.num_heads * (cfg.width // cfg.num_heads) * 4  # K+V, 4 rows (CFG), fp32
    assert full.stats.peak_kv_cache_bytes == token_bytes * 30 and full.stats.peak_kv_live_bytes == token_bytes * 30
    comp = sample_next_scale(model, tok, [1, 2], generator=torch.Generator().manual_seed(0),
                             cache=StreamingLLM(budget=0.5, backend="torch"))
    assert 0 < comp.stats.peak_kv_live_bytes < full.stats.peak_kv_live_bytes
    assert comp.stats.peak_kv_cache_bytes >= comp.stats.peak_kv_live_bytes
    assert "peak_kv_live_bytes" in comp.stats.as_dict()
