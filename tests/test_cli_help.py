"""Every option of every var-* command has help text that states its default (or has none to state) and lists its
choices (issue 12/14: the --help output is the reference of each command)."""
import argparse

from var.cli import bench, eval as eval_cli, sample, train


def _options(parser, prog):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, f"{prog} {name}")
        elif action.option_strings and action.dest != "help":
            yield prog, parser, action


def _all_options():
    for prog, build in (("var-sample", sample.build_parser), ("var-eval", eval_cli.build_parser),
                        ("var-bench", bench.build_parser), ("var-train", train.build_parser)):
        yield from _options(build(), prog)


def _problems(prog, parser, action) -> list[str]:
    flag, text = f"{prog} {action.option_strings[0]}", action.help or ""
    if not text.strip():
        return [f"{flag}: no help"]
    problems = []
    shows_defaults = issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter)
    if action.default not in (None, False, argparse.SUPPRESS, []) and not shows_defaults \
            and "default" not in text.lower():
        problems.append(f"{flag}: default {action.default!r} not stated")
    if action.choices is not None and action.metavar is not None and "Samplers:" not in text \
            and not all(str(c) in text for c in action.choices):
        problems.append(f"{flag}: choices hidden by its metavar and not in the help")
    return problems


def test_every_option_has_help_with_its_default_and_choices():
    options = list(_all_options())
    assert len(options) > 100  # all four commands and their subcommands were walked
    problems = [p for option in options for p in _problems(*option)]
    assert not problems, "\n".join(problems)


def test_every_training_config_field_has_help():
    import dataclasses
    fields = {f.name for cls in (train.DataConfig, *train.MODEL_CONFIGS.values())
              for f in dataclasses.fields(cls)}
    from var.train.trainer import TrainConfig
    fields |= {f.name for f in dataclasses.fields(TrainConfig)}
    assert not fields - set(train.FIELD_HELP), "fields without --help text"
