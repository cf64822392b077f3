"""The cache and policy interfaces are typing.Protocols: the real classes satisfy them, others get named errors."""
import pytest
import torch

from var.errors import ConfigError, UnsupportedCacheError
from var.kernels import (H2O, HACK, AttentionCache, CachePolicy, CompressedKVCache, DenseCache, FullCache, KVCache,
                         ScaleKV, SelectionPolicy, SnapKV, StreamingLLM)
from var.models import create
from var.samplers.jacobi import sample_sjd


def test_the_caches_and_policies_satisfy_their_protocols():
    dense = KVCache(1, 1, 1, 4, 2)
    compressed = CompressedKVCache(1, 1, 1, 2, capacity=4)
    assert isinstance(dense, DenseCache) and isinstance(dense, AttentionCache) and dense.supports_block_prefill
    assert isinstance(compressed, AttentionCache) and not isinstance(compressed, DenseCache)
    assert not compressed.supports_block_prefill
    for policy in (FullCache(), ScaleKV(0.5), HACK(0.5), SnapKV(0.5), H2O(0.5), StreamingLLM(0.5)):
        assert isinstance(policy, CachePolicy)
    for policy in (ScaleKV(0.5), HACK(0.5), SnapKV(0.5), H2O(0.5), StreamingLLM(0.5)):
        assert isinstance(policy, SelectionPolicy)


def test_a_policy_without_the_interface_is_named():
    class KeepAll:
        def select(self, ctx):
            return None

    with pytest.raises(ConfigError, match="KeepAll lacks the SelectionPolicy interface"):
        CompressedKVCache(1, 1, 1, 2, capacity=4, policy=KeepAll())


def test_sjd_needs_the_dense_cache():
    """SJD moves accepted window K/V inside cache.k / cache.v: a model handing out another cache is refused."""
    torch.manual_seed(0)
    model = create("gpt_tiny").eval()
    c = model.config
    model.new_kv_cache = lambda rows, capacity=None, **kw: CompressedKVCache(
        c.n_layer, rows, c.n_head, c.dim // c.n_head, capacity=capacity)
    with pytest.raises(UnsupportedCacheError, match="SJD .* CompressedKVCache"):
        sample_sjd(model, None, [0], window=4, decode=False, generator=torch.Generator().manual_seed(0))
