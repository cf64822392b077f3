"""``var-bench``: one speed / memory / quality table over model families, samplers and KV-cache policies.

Examples::

    var-bench                                   # CPU, tiny random-weight families (+ the bundled model if installed)
    var-bench --device cuda --models var_d16 var_d30 --num-images 256 --batch 64
    var-bench --samplers next_scale --policies ScaleKV HACK --budgets 0.5 0.1
    var-bench --families infinity text-to-image --prompts-file prompts.txt --budgets 0.1   # text-to-image rows
    var-bench kv --images 8                     # subcommands: one benchmark each (var-bench SUBCOMMAND --help)
    var-bench original --original ~/src/VAR     # our VAR stack against a checkout of the original

Writes ``<out-dir>/<tag>.md``, ``.json`` and ``.png`` (speed vs quality; default out-dir: a new temporary folder)
with the machine named in each; the samplers and cache policies are those of the registry
(``var.samplers.registry``), each with its own defaults.
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
import tempfile

import torch

from var.cli import command_line
from var.eval import (bench_ar, bench_code_nar_ctf, bench_infinity_kv, bench_kv, bench_t2i_bundled, bench_var,
                      bundled_quality, compare_infinity_original, compare_llamagen_original, compare_original)

log = logging.getLogger("var.cli.bench")
# var-bench SUBCOMMAND: module with add_arguments(parser) and run(args), and what it measures
SUBCOMMANDS = {
    "kv": (bench_kv, "KV-cache compression policies on VAR: bytes, speed, agreement with the full cache"),
    "ar": (bench_ar, "next-token samplers on one GPT: passes, accepted tokens, images/s, NLL, class accuracy"),
    "code-nar-ctf": (bench_code_nar_ctf, "CoDe per draft steps, NAR and CTF against the plain samplers"),
    "var-speed": (bench_var, "VAR sampling: no cache vs KV cache vs a compiled step vs bf16"),
    "bundled": (bundled_quality, "class accuracy of the bundled models' samples, PSNR of their tokenizers"),
    "original": (compare_original, "our VAR stack against a checkout of the original VAR code (--original DIR)"),
    "infinity-kv": (bench_infinity_kv, "KV-cache policies on a small random Infinity: PSNR vs full, bytes, speed"),
    "original-infinity": (compare_infinity_original,
                          "our Infinity stack against a checkout of the original Infinity code (--original DIR)"),
    "original-llamagen-t2i": (compare_llamagen_original,
                              "our text-to-image GPT against a checkout of the original LlamaGen (--original DIR)"),
    "t2i-bundled": (bench_t2i_bundled, "attribute classifier and prompt accuracy of the bundled text-to-image model"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="var-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    from var.samplers.registry import SAMPLERS, cache_policies
    from var.eval.benchmark import KV_PROFILES
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--num-images", type=int, default=64, help="images per row (speed and quality)")
    p.add_argument("--batch", type=int, default=16, help="images per sampler call in the timed runs")
    p.add_argument("--repeats", type=int, default=3, help="batch-1 calls (latency = the fastest)")
    p.add_argument("--timed-runs", type=int, default=2, help="timed batch runs per row (images/s = the fastest)")
    p.add_argument("--budgets", type=float, nargs="*", default=[0.5, 0.25, 0.1], help="cache-policy budgets")
    p.add_argument("--kv-profile", choices=KV_PROFILES, default="calibrate",
                   help="calibration profiles of ScaleKV/HACK: calibrate each VAR setup before its rows, or "
                        "'bundled': the shipped profile on the bundled VAR (random-weight setups are still "
                        "calibrated)")
    p.add_argument("--models", nargs="*", default=[], help="extra random-weight VAR presets (e.g. var_d16)")
    p.add_argument("--families", nargs="*", default=[], help="only setups whose name contains one of these")
    p.add_argument("--samplers", nargs="*", default=[], choices=list(SAMPLERS), metavar="SAMPLER",
                   help=f"only these samplers of the registry ({', '.join(SAMPLERS)}); none given: all, each with "
                        f"its own defaults, on every setup whose models it drives")
    compress = [n for n in cache_policies() if n != "FullCache"]
    p.add_argument("--policies", nargs="*", default=[], choices=compress, metavar="POLICY",
                   help=f"only these compression policies ({', '.join(compress)}); none given: all")
    p.add_argument("--extractor", choices=("auto", "classifier", "random-conv"), default="auto",
                   help="offline feature extractor of the fd/kid columns")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled batches")
    p.add_argument("--prompts-file", default=None,
                   help="prompts of the text-to-image setups (Infinity, the bundled text-to-image GPT), one per line; "
                        "image i answers prompt i %% P (default: the bundled model's seen and held-out evaluation "
                        "prompts)")
    p.add_argument("--compile", action="store_true",
                   help="samplers with a compiled path run it (torch.compile of the per-step forward, CUDA graphs "
                        "on CUDA; the warm-up call compiles)")
    p.add_argument("--out-dir", default=None,
                   help="where the report goes (default: a new temporary folder, so the committed benchmarks/ "
                        "files are only replaced when asked for)")
    p.add_argument("--tag", default=None, help="file name stem (default: samplers_<device kind>)")
    p.add_argument("--merge", nargs="*", default=[], metavar="JSON",
                   help="earlier reports (same machine and settings) whose rows join this table")
    sub = p.add_subparsers(dest="command", metavar="SUBCOMMAND",
                           help="another benchmark instead of the table (var-bench SUBCOMMAND --help):")
    for name, (module, text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=text, description=module.__doc__.split("\n\n")[0],
                            epilog=module.__doc__.split("\n\n", 1)[-1],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sp)
    return p


def default_tag(device: str) -> str:
    if str(device).startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
        return "samplers_" + re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    return "samplers_cpu"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    if args.command == "original":
        return compare_original.run(args, argv[1:] if argv else None)
    if args.command:
        return SUBCOMMANDS[args.command][0].run(args)
    from var.eval.benchmark import run_benchmark
    import json
    from var.eval.report import merge_reports, to_markdown, write_report
    from var.cli.sample import read_prompts
    report = run_benchmark(device=args.device, num_images=args.num_images, batch=args.batch, repeats=args.repeats,
                           budgets=tuple(args.budgets), seed=args.seed, models=tuple(args.models),
                           extractor=args.extractor, samplers=tuple(args.samplers), policies=tuple(args.policies),
                           timed_runs=args.timed_runs, families=tuple(args.families), compile=args.compile,
                           kv_profile=args.kv_profile, prompts=read_prompts(args))
    if args.merge:
        report = merge_reports([json.loads(open(p).read()) for p in args.merge] + [report])
    out_dir = args.out_dir or tempfile.mkdtemp(prefix="var-bench-")
    paths = write_report(report, out_dir, args.tag or default_tag(args.device))
    print(to_markdown(report))
    log.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return 0


cli = command_line(main)

if __name__ == "__main__":
    sys.exit(cli())
