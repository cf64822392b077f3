"""The sampler registry is the one list of samplers: every sampler is in it, every command reads it, settings and
models are checked against it by name."""
import importlib
import inspect
import pkgutil

import pytest
import torch

import var.samplers
from var.errors import ConfigError
from var.models import create
from var.samplers.registry import ENGINES, SAMPLERS, get_sampler, make_cache_policy


def _public_sampler_functions():
    """Every public ``sample_*`` function of var.samplers outside the logits helpers (``sample_from_uniform`` draws
    one index per row of a distribution: a building block, not a sampler)."""
    for info in pkgutil.iter_modules(var.samplers.__path__):
        if info.name == "logits":
            continue
        module = importlib.import_module(f"var.samplers.{info.name}")  # an import error fails the test
        for name, fn in vars(module).items():
            if name.startswith("sample_") and inspect.isfunction(fn) and fn.__module__ == module.__name__:
                yield name, fn


def test_every_sampler_function_is_registered_or_a_named_engine():
    registered = {spec.fn for spec in SAMPLERS.values()}
    found = dict(_public_sampler_functions())
    missing = [name for name, fn in found.items() if fn not in registered and fn not in ENGINES]
    assert not missing, f"samplers missing from var.samplers.registry: {missing}"
    assert len(found) == len(SAMPLERS) + len(ENGINES)
    assert {f"sample_{name}" for name in SAMPLERS} <= set(var.samplers.__all__)  # and exported


def test_registry_entries_are_consistent():
    for name, spec in SAMPLERS.items():
        params = inspect.signature(spec.fn).parameters
        condition = {"labels": "labels_B", "text": "text"}[spec.condition]
        assert list(params)[:len(spec.roles) + 1] == [*spec.model_roles, condition], name
        if spec.family != "text_to_image":
            assert spec.model_roles[-1] == "tokenizer", name  # one name for the tokenizer argument
        guidance = {"next_token": "cfg_scale", "next_scale": "cfg", "text_to_image": "cfg_list"}[spec.family]
        assert guidance in spec.knob_index, name
        defaults = spec.defaults()
        for knob_name, value in defaults.items():
            spec.knob_index[knob_name].check(name, value)  # every default is an allowed value
        assert spec.reference in ("", *SAMPLERS), name


def test_defaults_come_from_the_sampler_signatures():
    assert get_sampler("mcsjd").defaults()["window"] == inspect.signature(SAMPLERS["mcsjd"].fn).parameters[
        "window"].default
    assert get_sampler("sjd").defaults()["window"] == 16
    assert get_sampler("next_scale").defaults()["cfg"] == 1.5
    assert get_sampler("next_token").defaults()["cfg_scale"] == 2.0
    assert get_sampler("collaborative").required() == ["draft_steps"]


def test_unknown_and_out_of_range_settings_are_errors_naming_them():
    spec = get_sampler("sjd")
    with pytest.raises(ConfigError, match="no setting bogus"):
        spec.check_settings({"bogus": 1})
    with pytest.raises(ConfigError, match="cfg_scale"):  # VAR's name on a next-token sampler: a hint, no silence
        spec.check_settings({"cfg": 2.0})
    with pytest.raises(ConfigError, match="window"):
        spec.check_settings({"window": 0})
    with pytest.raises(ConfigError, match="init"):
        spec.check_settings({"init": "zeros"})
    with pytest.raises(ConfigError, match="top_p"):
        get_sampler("next_scale").check_settings({"top_p": 1.5})
    with pytest.raises(ConfigError, match="draft_steps"):
        get_sampler("collaborative").check_settings({})
    with pytest.raises(ConfigError, match="unknown sampler 'nope'"):
        get_sampler("nope")
    assert spec.check_settings({"window": 4.0, "cfg_scale": 3}) == {"window": 4, "cfg_scale": 3.0}


def test_a_sampler_refuses_a_model_it_cannot_drive_by_name():
    vq, gpt, nar = create("vq_tiny").eval(), create("gpt_tiny").eval(), create("nar_tiny").eval()
    with pytest.raises(ConfigError, match="sampler nar drives a NAR as model, got GPT"):
        get_sampler("nar")({"model": gpt, "tokenizer": vq}, [1])
    with pytest.raises(ConfigError, match="sampler nar drives a NAR as model, got GPT"):
        var.samplers.sample_nar(gpt, vq, [1])  # the function itself refuses too
    with pytest.raises(ConfigError, match="sampler sjd drives a GPT as model, got NAR"):
        get_sampler("sjd")({"model": nar, "tokenizer": vq}, [1])
    with pytest.raises(ConfigError, match="MultiScaleVQVAE as tokenizer, got SingleScaleVQ"):
        get_sampler("next_scale")({"model": create("var_tiny").eval(), "tokenizer": vq}, [1])
    with pytest.raises(ConfigError, match="missing \\['model'\\]"):
        get_sampler("next_token")({"tokenizer": vq}, [1])


def test_the_registry_call_equals_the_direct_call():
    gpt = create("gpt_tiny").eval()
    via = get_sampler("zipar")({"model": gpt, "tokenizer": None}, [1, 2], generator=torch.Generator().manual_seed(0),
                               window=2, top_k=5)
    direct = var.samplers.sample_zipar(gpt, None, [1, 2], generator=torch.Generator().manual_seed(0), window=2,
                                       top_k=5)
    assert torch.equal(via.tokens, direct.tokens)


def test_cache_policies_need_a_budget_and_a_budget_needs_a_policy():
    assert make_cache_policy(None) is None
    with pytest.raises(ConfigError, match="budget needs a compression policy"):
        make_cache_policy(None, 0.1)
    with pytest.raises(ConfigError, match="needs a budget"):
        make_cache_policy("ScaleKV")
    with pytest.raises(ConfigError, match="unknown cache policy"):
        make_cache_policy("Nope", 0.1)
    assert make_cache_policy("SnapKV", 0.25).budget == 0.25
    with pytest.raises(ConfigError, match="takes no cache"):
        get_sampler("next_token")({"model": create("gpt_tiny").eval(), "tokenizer": None}, [1],
                                  cache=make_cache_policy("FullCache"))


def test_one_registry_drives_the_command_lines(capsys):
    from var.cli.bench import build_parser as bench_parser
    from var.cli.eval import build_parser as eval_parser
    from var.cli.sample import build_parser as sample_parser
    sample_help = sample_parser().format_help()
    for name, spec in SAMPLERS.items():  # --sampler lists each class-conditional sampler with its family
        assert (f"{name} ({spec.family}," in " ".join(sample_help.split())) == (spec.condition == "labels")
    assert "16 (sjd, lantern, gsd); 32 (mcsjd)" in " ".join(sample_help.split())  # per-sampler defaults
    eval_sample = eval_parser()._subparsers._group_actions[0].choices["sample"]
    class_conditional = [name for name, spec in SAMPLERS.items() if spec.condition == "labels"]
    # var-sample drives Infinity through --family infinity; var-eval sample through --sampler with a prompts file
    for parser, expected in ((sample_parser(), class_conditional), (eval_sample, list(SAMPLERS))):
        choices = next(a.choices for a in parser._actions if "--sampler" in a.option_strings)
        assert list(choices) == expected
    bench_choices = next(a.choices for a in bench_parser()._actions if "--samplers" in a.option_strings)
    assert list(bench_choices) == list(SAMPLERS)
