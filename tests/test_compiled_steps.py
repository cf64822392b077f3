"""Compiled sampling steps (var.models.compiled): the static-shape decode step equals GPT.decode; compiled steps equal
eager ones; recompilation counts from torch._dynamo's counters (the quick ``aot_eager`` backend traces the same
graphs inductor compiles; the inductor runs are in the slow tier, being ~15-70 s each on a CPU)."""
import pytest
import torch
from torch._dynamo.utils import counters

from helpers import tiny_var_pair
from var.errors import ConfigError
from var.kernels import ScaleKV
from var.kernels.kv_cache import FullCache, KVCache
from var.models import create
from var.models.compiled import CompileSpec, DecodeStep, ScaleStep, compile_spec, decode_cache, reusable_cache
from var.models.conditioning import CaptionCondition


def _gpt(seed=0, name="gpt_tiny"):
    torch.manual_seed(seed)
    gpt = create(name).eval()
    torch.nn.init.normal_(gpt.output.weight, std=0.5)  # LlamaGen zero-inits the head: make logits matter
    return gpt


def _decoded_logits(gpt, cond, idx, step_fn):
    """Logits of the prefill and every one-token step feeding ``idx``: ``[B, N, V]``."""
    cache, step = step_fn(len(cond) if isinstance(cond, CaptionCondition) else cond.shape[0])
    out = [gpt.prefill(cond, cache)]
    out += [step(cache, idx[:, i:i + 1]) for i in range(idx.shape[1] - 1)]
    return torch.cat(out, 1)


def _plain(gpt):
    def make(rows):
        return gpt.new_kv_cache(rows), lambda cache, idx: gpt.decode(idx, cache)
    return make


def _static(gpt, spec=None):
    def make(rows):
        cache = decode_cache(gpt, rows, spec)
        holder = {}

        def step(cache, idx):
            holder.setdefault("step", DecodeStep(gpt, cache, spec))  # after the prefill: slot = cache length
            return holder["step"](idx)
        return cache, step
    return make


def _frames():
    return counters["frames"]["ok"], counters["stats"]["unique_graphs"]


@torch.no_grad()
def test_attend_at_equals_attend():
    g = torch.Generator().manual_seed(0)
    a, b = (KVCache(1, 2, 3, 8, 4) for _ in range(2))
    for n in (3, 1, 2):
        q, k, v = (torch.randn(2, 3, n, 4, generator=g) for _ in range(3))
        start = a.length
        slots = torch.arange(start, start + n)
        mask = (torch.arange(8)[None, :] <= slots[:, None])[None, None]
        causal = (torch.arange(start + n)[None, :] <= slots[:, None])[None, None]
        ref = a.attend(0, q, k, v, scale=0.5, attn_mask=causal)
        out = b.attend_at(0, q, k, v, slots, scale=0.5, attn_mask=mask)
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
        a.advance(n)
        b.advance(n)
    torch.testing.assert_close(b.k[0][:, :, :6], a.k[0][:, :, :6])


@torch.no_grad()
def test_static_decode_step_equals_decode():
    gpt = _gpt()
    labels, idx = torch.tensor([1, 2, 3]), torch.randint(0, 64, (3, gpt.seq_len), generator=torch.Generator())
    ref = _decoded_logits(gpt, labels, idx, _plain(gpt))
    torch.testing.assert_close(_decoded_logits(gpt, labels, idx, _static(gpt)), ref, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_static_decode_step_hides_caption_padding():
    torch.manual_seed(0)
    gpt = _gpt(name="gpt_tiny_t2i")
    g = torch.Generator().manual_seed(0)
    cond = CaptionCondition.left_padded([torch.randn(n, 16, generator=g) for n in (1, 5, 8)], 8)
    idx = torch.randint(0, 64, (3, gpt.seq_len), generator=g)
    ref = gpt.teacher_forcing_logits(cond, idx)
    torch.testing.assert_close(_decoded_logits(gpt, cond, idx, _static(gpt)), ref, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_decode_step_overflow_is_a_config_error():
    gpt = _gpt()
    cache = gpt.new_kv_cache(1, capacity=2)
    gpt.prefill(torch.tensor([0]), cache)
    step = DecodeStep(gpt, cache, None)
    step(torch.zeros(1, 1, dtype=torch.long))
    with pytest.raises(ConfigError, match="overflow"):
        step(torch.zeros(1, 1, dtype=torch.long))


@torch.no_grad()
def test_compiled_decode_step_is_one_graph_for_every_step_and_sample():
    """Recompiles: the decode step compiles once (1 graph) for all grid^2 - 1 steps; a second sample (same rows)
    compiles nothing. Logits equal the eager static step's."""
    torch._dynamo.reset()
    gpt = _gpt()
    labels, idx = torch.tensor([1, 2, 3]), torch.randint(0, 64, (3, gpt.seq_len), generator=torch.Generator())
    ref = _decoded_logits(gpt, labels, idx, _static(gpt))
    spec = CompileSpec(backend="aot_eager")
    before = _frames()
    out = _decoded_logits(gpt, labels, idx, _static(gpt, spec))
    first = _frames()
    again = _decoded_logits(gpt, labels, idx, _static(gpt, spec))
    assert (first[0] - before[0], first[1] - before[1]) == (1, 1)
    assert _frames() == first  # no recompilation for a second sample
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, ref, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_compiled_scale_step_is_one_graph_per_scale():
    """Recompiles: one graph per VAR scale (4 for the tiny schedule) at the first sample, none for a second."""
    torch._dynamo.reset()
    tok, model = tiny_var_pair()
    rows, num_scales = 4, len(tok.patch_nums)
    cond = model.class_condition(torch.tensor([1, 2, 10, 10]))

    def logits(spec):
        step = ScaleStep(model, spec)
        cache = step.new_cache(FullCache(), rows, torch.device("cpu"))
        g = torch.Generator().manual_seed(0)
        x, out = model.first_scale_input(cond), []
        for si in range(num_scales):
            out.append(step(x, cond, cache))
            if si + 1 < num_scales:
                pn = tok.patch_nums[si + 1]
                x = model.scale_input(si + 1, torch.randn(rows, pn * pn, tok.embed_dim, generator=g))
        return torch.cat(out, 1)

    ref = logits(None)
    before = _frames()
    out = logits(CompileSpec(backend="aot_eager"))
    first = _frames()
    again = logits(CompileSpec(backend="aot_eager"))
    assert (first[0] - before[0], first[1] - before[1]) == (num_scales, num_scales)
    assert _frames() == first
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, ref, atol=1e-5, rtol=1e-5)


def test_compile_arguments_and_caches():
    assert compile_spec(False) is None and compile_spec(None) is None
    assert compile_spec(True) == CompileSpec()
    assert compile_spec("aot_eager").backend == "aot_eager"
    with pytest.raises(ConfigError, match="compile"):
        compile_spec(3)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert CompileSpec().mode_on(cuda) == "reduce-overhead" and CompileSpec().cuda_graphs(cuda)
    assert CompileSpec().mode_on(cpu) == "default" and not CompileSpec().cuda_graphs(cpu)
    assert CompileSpec(backend="aot_eager").mode_on(cuda) is None
    tok, model = tiny_var_pair()
    with pytest.raises(ConfigError, match="full cache"):
        ScaleStep(model, CompileSpec(backend="aot_eager")).new_cache(ScaleKV(budget=0.5), 2, torch.device("cpu"))
    first = reusable_cache(model, "k", lambda: model.new_kv_cache(2))
    first.k[0].fill_(float("nan"))
    first.advance(3)
    again = reusable_cache(model, "k", lambda: model.new_kv_cache(2))
    assert again is first and again.length == 0 and not again.k[0].isnan().any()  # cleared on reuse


@pytest.mark.slow
@torch.no_grad()
def test_inductor_steps_equal_eager():
    """The default backend (inductor, ~1 min on a CPU): logits within fp32 tolerance of eager."""
    torch._dynamo.reset()
    gpt = _gpt()
    labels, idx = torch.tensor([1, 2, 3]), torch.randint(0, 64, (3, gpt.seq_len), generator=torch.Generator())
    ref = _decoded_logits(gpt, labels, idx, _static(gpt))
    out = _decoded_logits(gpt, labels, idx, _static(gpt, compile_spec(True)))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


# ---- the samplers ---------------------------------------------------------------------------------------------
def _same_tokens(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens))


@torch.no_grad()
def test_compiled_next_scale_sampler_gives_the_eager_tokens():
    """Same generator -> the same tokens (the draws stay eager); recompiles: one graph per scale for each batch
    size, none when a batch size comes back."""
    from var.samplers import sample_next_scale

    torch._dynamo.reset()
    tok, model = tiny_var_pair()
    num_scales = len(tok.patch_nums)

    def run(labels, compile):
        return sample_next_scale(model, tok, labels, cfg=1.5, top_k=20, generator=torch.Generator().manual_seed(0),
                                 decode=False, compile=compile)

    before = _frames()
    for labels in ([1, 2, 3], [4, 5], [1, 2, 3]):
        assert _same_tokens(run(labels, "aot_eager"), run(labels, False))
    assert (_frames()[0] - before[0], _frames()[1] - before[1]) == (2 * num_scales, 2 * num_scales)
    with pytest.raises(ConfigError, match="full cache"):
        sample_next_scale(model, tok, [1], compile="aot_eager", cache=ScaleKV(budget=0.5))


@pytest.mark.slow
@torch.no_grad()
def test_inductor_next_scale_sampler_gives_the_eager_tokens():
    from var.samplers import sample_next_scale

    torch._dynamo.reset()
    tok, model = tiny_var_pair()
    outs = [sample_next_scale(model, tok, [1, 2, 3], cfg=1.5, generator=torch.Generator().manual_seed(0),
                              compile=compile) for compile in (False, True)]
    assert _same_tokens(*outs)
    torch.testing.assert_close(outs[1].images, outs[0].images, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_compiled_next_token_sampler_gives_the_eager_tokens():
    """The static decode step, compiled: one graph for all steps of every sample of a batch size; same tokens."""
    from var.samplers import sample_next_token

    torch._dynamo.reset()
    gpt = _gpt()

    def run(compile, seed=0):
        return sample_next_token(gpt, None, [1, 2, 3], cfg_scale=2.0, top_k=20, decode=False,
                                 generator=torch.Generator().manual_seed(seed), compile=compile).tokens

    before = _frames()
    for seed in (0, 1):
        assert torch.equal(run("aot_eager", seed), run(False, seed))
    assert (_frames()[0] - before[0], _frames()[1] - before[1]) == (1, 1)


@torch.no_grad()
def test_compiled_jacobi_window_gives_the_eager_tokens():
    """SJD / MC-SJD with the window pass compiled: the full-width static pass (one graph for every pass of every
    sample of a batch size) gives the eager sampler's tokens, which narrows the last windows."""
    from var.samplers import sample_mcsjd, sample_sjd

    torch._dynamo.reset()
    gpt = _gpt()

    def run(sampler, compile, **kw):
        gens = [torch.Generator().manual_seed(s) for s in range(3)]
        return sampler(gpt, None, [1, 2, 3], window=6, top_k=20, decode=False, generator=gens, compile=compile,
                       **kw).tokens

    before = _frames()
    assert torch.equal(run(sample_sjd, "aot_eager"), run(sample_sjd, False))
    assert torch.equal(run(sample_mcsjd, "aot_eager", coupling="gumbel"), run(sample_mcsjd, False, coupling="gumbel"))
    assert (_frames()[0] - before[0], _frames()[1] - before[1]) == (1, 1)


@torch.no_grad()
def test_registry_passes_compile_to_the_samplers_that_have_a_compiled_path():
    from var.samplers.registry import SAMPLERS

    assert {n for n, s in SAMPLERS.items() if s.takes_compile} == {"next_scale", "next_token", "sjd", "mcsjd",
                                                                   "lantern", "gsd"}
    tok, model = tiny_var_pair()
    spec = SAMPLERS["next_scale"]
    outs = [spec({"model": model, "tokenizer": tok}, torch.tensor([1, 2]), generator=torch.Generator().manual_seed(0),
                 decode=False, compile=compile) for compile in (False, "eager")]
    assert _same_tokens(*outs)
    with pytest.raises(ConfigError, match="no compiled path"):
        SAMPLERS["zipar"]({"model": _gpt(), "tokenizer": None}, torch.tensor([1]), compile=True)


@pytest.mark.slow
def test_var_sample_compile_flag_end_to_end(tmp_path):
    """``var-sample --compile`` (inductor on a CPU: about a minute) writes the same grid as eager."""
    from var.cli.sample import main

    torch._dynamo.reset()
    for flag in ([], ["--compile"]):
        assert main(["--random-init", "--classes", "1", "2", "--out", str(tmp_path / f"g{len(flag)}.png"), *flag,
                     "--device", "cpu"]) == 0
    assert (tmp_path / "g0.png").read_bytes() == (tmp_path / "g1.png").read_bytes()


def test_var_bench_compile_flag_compiles_the_full_cache_rows(tmp_path, monkeypatch):
    """``var-bench --compile``: the full-cache rows of a sampler with a compiled path run it (column ``compiled``),
    compressed-cache rows stay eager. torch.compile is forced to dynamo's ``eager`` backend (inductor on a CPU takes
    minutes) and counted."""
    import json

    from var.cli.bench import main

    calls = []
    real_compile = torch.compile

    def eager_compile(fn, **kwargs):
        calls.append(kwargs)
        return real_compile(fn, **{**kwargs, "backend": "eager", "mode": None})
    monkeypatch.setattr(torch, "compile", eager_compile)
    monkeypatch.setattr("var.models.compiled._COMPILED", {})  # no wrapper an earlier test compiled
    monkeypatch.setenv("VAR_KERNELS", "torch")
    torch._dynamo.reset()
    assert main(["--device", "cpu", "--num-images", "4", "--batch", "2", "--repeats", "1", "--timed-runs", "1",
                 "--budgets", "0.25", "--extractor", "random-conv", "--samplers", "next_scale", "--policies",
                 "StreamingLLM", "--families", "var_tiny (random)", "--compile", "--out-dir", str(tmp_path),
                 "--tag", "t"]) == 0
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert {(r["cache"], r["compiled"]) for r in rows} == {("full", True), ("StreamingLLM", False)}
    assert calls and all(c.get("backend") == "inductor" for c in calls)  # what --compile asks for
