"""``var-train``: train tokenizers, VAR and AR models (one process, or ``torchrun`` for DDP/FSDP).

Subcommands::

    var-train tokenizer-ms --data shapes --out-dir runs/msvq      # multi-scale VQ-VAE (VAR's tokenizer)
    var-train tokenizer-ss --data shapes --out-dir runs/ssvq      # single-scale VQ (LlamaGen's tokenizer)
    var-train var --tokenizer runs/msvq/model --data shapes ...   # VAR transformer over a frozen tokenizer
    var-train ar  --tokenizer runs/ssvq/model --data shapes ...   # AR GPT over a frozen tokenizer
    torchrun --nproc_per_node=8 -m var.cli.train var --data /imagenet/train --precision bf16 ...

``--data`` is ``shapes`` (the offline procedural dataset) or an ImageNet-style folder. Every config field
is a flag (``--help`` lists them with defaults); ``--config run.json`` reads defaults from a JSON file with
``data`` / ``model`` / ``train`` sections (the ``run_config.json`` a run writes has that layout). The final
model is written with :func:`var.hub.save_pretrained` to ``<out-dir>/model`` (EMA weights when EMA is on) and
to ``--export-dir`` when given (for var/ar: ``<export-dir>/tokenizer`` + ``<export-dir>/transformer``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from var.cli import command_line
from var.errors import ConfigError
from var.train.trainer import DistEnv, Trainer, TrainConfig, prepare_out_dir
from var.utils.checks import AT_LEAST_ONE, FRACTION, NON_NEGATIVE, POSITIVE, PROBABILITY_BELOW_ONE, check_fields


log = logging.getLogger("var.cli.train")


# ---- configs --------------------------------------------------------------------------------------------------
class _RangeChecked:
    """Dataclass mixin: every numeric field must be finite, and the fields named in the ``RANGES`` of the class
    and its bases must lie in their intervals (``var.utils.checks``); checked when the config is built."""

    RANGES: dict = {}

    def __post_init__(self):
        ranges = {}
        for cls in reversed(type(self).__mro__):
            ranges.update(cls.__dict__.get("RANGES", {}))
        numeric = {f.name: (None, None, False, False) for f in dataclasses.fields(self)
                   if isinstance(getattr(self, f.name), (int, float)) and not isinstance(getattr(self, f.name), bool)}
        check_fields(self, {**numeric, **ranges})


@dataclass
class DataConfig(_RangeChecked):
    data: str = "shapes"          # "shapes" (offline procedural dataset) or an ImageNet-style folder
    image_size: int = 32
    num_images: int = 20000       # shapes only: dataset size
    data_seed: int = 0            # shapes only: the dataset is a pure function of this seed
    num_classes: int = 10         # shapes only (folders: number of sub-folders)
    hflip: bool = False           # random horizontal flips
    pretokenize: bool = True      # var/ar on un-augmented data: encode every image once before training
    RANGES = {"image_size": AT_LEAST_ONE, "num_images": AT_LEAST_ONE, "data_seed": NON_NEGATIVE,
              "num_classes": AT_LEAST_ONE}


@dataclass
class VQObjectiveConfig(_RangeChecked):
    """The tokenizer objective (``VQObjective`` arguments), shared by both tokenizer commands."""

    recon: str = "l1"                       # l1 | l2
    recon_weight: float = 1.0
    vq_weight: float = 1.0
    perceptual_weight: float = 0.0
    perceptual_path: str = ""               # local VGG-16 weights (never downloaded)
    gan_weight: float = 0.0
    gan_start: int = 0
    codebook_init: str = "data"             # data: codes drawn from the first batch's quantizer inputs | model
    restart_dead_every: int = 50            # re-draw codes unused for this many steps (0: never)
    RANGES = {"recon_weight": NON_NEGATIVE, "vq_weight": NON_NEGATIVE, "perceptual_weight": NON_NEGATIVE,
              "gan_weight": NON_NEGATIVE, "gan_start": NON_NEGATIVE, "restart_dead_every": NON_NEGATIVE}


@dataclass
class MSTokenizerModelConfig(VQObjectiveConfig):
    """Multi-scale VQ-VAE (``MultiScaleVQVAEConfig`` fields) + the tokenizer objective."""

    vocab_size: int = 512
    z_channels: int = 16
    ch: int = 32
    ch_mult: tuple = (1, 2, 2)
    num_res_blocks: int = 1
    norm_groups: int = 8
    using_sa: bool = False
    using_mid_sa: bool = False
    beta: float = 0.25
    patch_nums: tuple = (1, 2, 3, 4, 6, 8)
    RANGES = {"vocab_size": AT_LEAST_ONE, "z_channels": AT_LEAST_ONE, "ch": AT_LEAST_ONE, "ch_mult": AT_LEAST_ONE,
              "num_res_blocks": AT_LEAST_ONE, "norm_groups": AT_LEAST_ONE, "beta": NON_NEGATIVE,
              "patch_nums": AT_LEAST_ONE}


@dataclass
class SSTokenizerModelConfig(VQObjectiveConfig):
    """Single-scale VQ (``SingleScaleVQConfig`` fields) + the tokenizer objective."""

    codebook_size: int = 512
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    z_channels: int = 32
    ch: int = 32
    ch_mult: tuple = (1, 2, 2)
    num_res_blocks: int = 1
    norm_groups: int = 8
    commit_loss_beta: float = 0.25
    RANGES = {"codebook_size": AT_LEAST_ONE, "codebook_embed_dim": AT_LEAST_ONE, "z_channels": AT_LEAST_ONE,
              "ch": AT_LEAST_ONE, "ch_mult": AT_LEAST_ONE, "num_res_blocks": AT_LEAST_ONE, "norm_groups": AT_LEAST_ONE,
              "commit_loss_beta": NON_NEGATIVE}


@dataclass
class VARModelConfig(_RangeChecked):
    """VAR transformer (``VARConfig`` fields; vocabulary, latent size and scales come from the tokenizer)."""

    tokenizer: str = ""                     # saved multi-scale tokenizer directory (required)
    depth: int = 4
    width: int = 128
    num_heads: int = 4
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    cond_drop_rate: float = 0.1             # class dropout for classifier-free guidance
    label_smoothing: float = 0.0
    init_adaln: float = 0.5
    init_adaln_gamma: float = 1e-3
    init_head: float = 0.02
    RANGES = {"depth": AT_LEAST_ONE, "width": AT_LEAST_ONE, "num_heads": AT_LEAST_ONE, "mlp_ratio": POSITIVE,
              "drop_path_rate": PROBABILITY_BELOW_ONE, "cond_drop_rate": FRACTION,
              "label_smoothing": PROBABILITY_BELOW_ONE}


@dataclass
class ARModelConfig(_RangeChecked):
    """AR GPT (``GPTConfig`` fields; vocabulary and grid come from the tokenizer)."""

    tokenizer: str = ""                     # saved single-scale tokenizer directory (required)
    dim: int = 128
    n_layer: int = 4
    n_head: int = 4
    multiple_of: int = 32
    token_dropout_p: float = 0.0
    resid_dropout_p: float = 0.0
    ffn_dropout_p: float = 0.0
    class_dropout_p: float = 0.1
    label_smoothing: float = 0.0
    RANGES = {"dim": AT_LEAST_ONE, "n_layer": AT_LEAST_ONE, "n_head": AT_LEAST_ONE, "multiple_of": AT_LEAST_ONE,
              "token_dropout_p": PROBABILITY_BELOW_ONE, "resid_dropout_p": PROBABILITY_BELOW_ONE,
              "ffn_dropout_p": PROBABILITY_BELOW_ONE, "class_dropout_p": FRACTION,
              "label_smoothing": PROBABILITY_BELOW_ONE}


MODEL_CONFIGS = {"tokenizer-ms": MSTokenizerModelConfig, "tokenizer-ss": SSTokenizerModelConfig,
                 "var": VARModelConfig, "ar": ARModelConfig}


# ---- dataclass <-> argparse -----------------------------------------------------------------------------------
# --help text of every config field (a test checks that none is missing); choices are enforced by argparse
FIELD_HELP = {
    # data
    "data": "'shapes' (the offline procedural dataset) or an ImageNet-style folder of class sub-folders",
    "image_size": "training image size in pixels",
    "num_images": "shapes only: dataset size",
    "data_seed": "shapes only: the dataset is a pure function of this seed",
    "num_classes": "shapes only: number of classes (folders: the number of sub-folders)",
    "hflip": "random horizontal flips",
    "pretokenize": "var/ar on un-augmented data: encode every image once before training",
    # tokenizer objective
    "recon": "reconstruction loss",
    "recon_weight": "weight of the reconstruction loss",
    "vq_weight": "weight of the codebook + commitment loss",
    "perceptual_weight": "weight of the LPIPS-style perceptual loss (0 = off; needs --perceptual-path)",
    "perceptual_path": "local VGG-16 weights for the perceptual loss (never downloaded)",
    "gan_weight": "weight of the patch-GAN loss (0 = off)",
    "gan_start": "step at which the GAN loss starts",
    "codebook_init": "data: codes drawn from the first batch's quantizer inputs; model: the model's own init",
    "restart_dead_every": "re-draw codes unused for this many steps (0 = never)",
    # tokenizer architectures
    "vocab_size": "codebook size V",
    "codebook_size": "codebook size V",
    "codebook_embed_dim": "code dimension",
    "codebook_l2_norm": "L2-normalise codes and inputs before the nearest-code search (LlamaGen)",
    "z_channels": "latent channels of the encoder output",
    "ch": "base channel count of the encoder/decoder",
    "ch_mult": "channel multiplier per resolution level (the downsample factor is 2^(levels - 1))",
    "num_res_blocks": "residual blocks per level",
    "norm_groups": "GroupNorm groups",
    "using_sa": "self-attention in the encoder/decoder blocks of the lowest resolution",
    "using_mid_sa": "self-attention in the middle block",
    "beta": "commitment loss weight inside the quantizer",
    "commit_loss_beta": "commitment loss weight inside the quantizer",
    "patch_nums": "token-grid side of each scale; the last times the downsample factor must equal --image-size",
    # transformers
    "tokenizer": "saved tokenizer directory (required): sets the vocabulary, latent size and scales",
    "depth": "transformer blocks",
    "width": "embedding width",
    "num_heads": "attention heads",
    "mlp_ratio": "MLP hidden width / width",
    "drop_path_rate": "stochastic depth rate (largest at the last block)",
    "cond_drop_rate": "class dropout for classifier-free guidance",
    "label_smoothing": "label smoothing of the token cross-entropy",
    "init_adaln": "VAR init: scale of the AdaLN modulation weights",
    "init_adaln_gamma": "VAR init: scale of the AdaLN gamma weights",
    "init_head": "VAR init: scale of the output head",
    "dim": "embedding width",
    "n_layer": "transformer blocks",
    "n_head": "attention heads",
    "multiple_of": "the MLP hidden width is rounded up to a multiple of this",
    "token_dropout_p": "dropout on the token embeddings",
    "resid_dropout_p": "dropout on the residual branches",
    "ffn_dropout_p": "dropout inside the MLP",
    "class_dropout_p": "class dropout for classifier-free guidance",
    # optimisation and bookkeeping (TrainConfig)
    "out_dir": "run folder: checkpoints, metrics (CSV, JSONL, TensorBoard), train_config.json",
    "steps": "optimizer steps",
    "batch_size": "images per rank and micro-step (global batch = batch-size x grad-accum x ranks)",
    "grad_accum": "micro-steps per optimizer step",
    "lr": "peak learning rate",
    "warmup_steps": "linear warm-up steps",
    "warmup_start_ratio": "warm-up starts at this fraction of --lr (VAR: 0.005)",
    "schedule": "learning-rate schedule after the warm-up",
    "end_lr_ratio": "final learning rate = end-lr-ratio x lr",
    "weight_decay": "AdamW weight decay (not on norms, biases, embeddings)",
    "betas": "AdamW betas",
    "clip_grad": "max global gradient norm (0 = no clipping; the norm is still logged)",
    "precision": "training precision (fp16 uses a GradScaler)",
    "ema_decay": "EMA decay of the weights (0 = no EMA)",
    "ckpt_every": "steps between checkpoints",
    "keep_checkpoints": "checkpoints kept (older ones are deleted)",
    "log_every": "steps between metric rows",
    "seed": "seed of the weights, the data order and the objective's randomness",
    "resume": "'' (start fresh), 'auto' (newest valid checkpoint in --out-dir) or a checkpoint path",
    "overwrite": "a fresh run may replace the run files (checkpoints, metrics) of an earlier run in --out-dir",
    "fsdp": "shard parameters with FSDP (under torchrun)",
    "find_unused_parameters": "DDP: some parameters get no gradient",
    "device": "auto: cuda:LOCAL_RANK when CUDA is available, else cpu",
    "num_workers": "DataLoader worker processes",
    "progress": "show a progress bar",
}
FIELD_CHOICES = {"recon": ("l1", "l2"), "codebook_init": ("data", "model"),
                 "schedule": ("cosine", "linear", "constant"), "precision": ("fp32", "bf16", "fp16")}


def _add_dataclass_args(parser: argparse.ArgumentParser, cls, title: str) -> None:
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = f"{FIELD_HELP[f.name]} (default {default!r})"
        if isinstance(default, bool):
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif isinstance(default, tuple):
            elem = type(default[0]) if default else str
            group.add_argument(flag, dest=f.name, type=elem, nargs="+", default=None, help=text)
        else:
            group.add_argument(flag, dest=f.name, type=type(default) if default is not None else str, default=None,
                               choices=FIELD_CHOICES.get(f.name), help=text)


def _build(cls, args: argparse.Namespace, file_section: dict):
    values = {}
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(file_section) - names
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} keys in --config: {sorted(unknown)}")
    values.update(file_section)
    for name in names:
        v = getattr(args, name, None)
        if v is not None:
            values[name] = tuple(v) if isinstance(v, list) else v
    return cls(**values)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="var-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for name, model_cls in MODEL_CONFIGS.items():
        sp = sub.add_parser(name, help=model_cls.__doc__.split("\n")[0])
        sp.add_argument("--config", help="JSON file with data/model/train sections (flags override it)")
        sp.add_argument("--export-dir", help="also write the final model(s) here (save_pretrained layout)")
        sp.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="logging level (default INFO)")
        _add_dataclass_args(sp, DataConfig, "data")
        _add_dataclass_args(sp, model_cls, "model and objective")
        _add_dataclass_args(sp, TrainConfig, "optimisation and bookkeeping")
    return p


# ---- builders -------------------------------------------------------------------------------------------------
def build_dataset(data: DataConfig):
    from var.train.data import build_dataset as build
    return build(data.data, image_size=data.image_size, hflip=data.hflip, num_images=data.num_images,
                 seed=data.data_seed, num_classes=data.num_classes)


class TokenDataset(torch.utils.data.Dataset):
    """Pre-computed token sequences ``[N, L]`` (int64) and labels of a dataset (no augmentation)."""

    def __init__(self, tokens_NL: torch.Tensor, labels_N: torch.Tensor, num_classes: int):
        self.tokens, self.labels, self.num_classes = tokens_NL, labels_N, num_classes

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, item):
        index = int(item[0]) if isinstance(item, (tuple, list)) else int(item)
        return self.tokens[index], int(self.labels[index])


@torch.no_grad()
def pretokenize(tokenizer, dataset, batch_size: int = 256, progress: bool = True) -> TokenDataset:
    """Encode every (un-augmented) image once: ``[N, L]`` concatenated tokens of all scales."""
    from tqdm.auto import tqdm
    tokens, labels = [], []
    for start in tqdm(range(0, len(dataset), batch_size), desc="pretokenize", unit="batch", leave=False,
                      disable=not progress):
        items = [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]
        images = torch.stack([x for x, _ in items])
        tokens.append(torch.cat([idx.flatten(1) for idx in tokenizer.encode(images)], dim=1).cpu())
        labels += [y for _, y in items]
    return TokenDataset(torch.cat(tokens), torch.tensor(labels, dtype=torch.long), dataset.num_classes)


def build_tokenizer_job(command: str, m, data: DataConfig, seed: int):
    from var.train.objectives import VQObjective
    if command == "tokenizer-ms":
        from var.tokenizers.multiscale_vqvae import MultiScaleVQVAE, MultiScaleVQVAEConfig
        config = MultiScaleVQVAEConfig(vocab_size=m.vocab_size, z_channels=m.z_channels, ch=m.ch, ch_mult=m.ch_mult,
                                       num_res_blocks=m.num_res_blocks, norm_groups=m.norm_groups,
                                       using_sa=m.using_sa, using_mid_sa=m.using_mid_sa, beta=m.beta,
                                       patch_nums=m.patch_nums)
        if config.image_size != data.image_size:
            raise ConfigError(f"patch_nums[-1] x downsample = {config.image_size} must equal --image-size "
                              f"{data.image_size}")
        model = MultiScaleVQVAE(config)
    else:
        from var.tokenizers.single_scale_vq import SingleScaleVQ, SingleScaleVQConfig
        model = SingleScaleVQ(SingleScaleVQConfig(
            codebook_size=m.codebook_size, codebook_embed_dim=m.codebook_embed_dim,
            codebook_l2_norm=m.codebook_l2_norm, z_channels=m.z_channels, ch=m.ch, ch_mult=m.ch_mult,
            num_res_blocks=m.num_res_blocks, norm_groups=m.norm_groups, commit_loss_beta=m.commit_loss_beta,
            image_size=data.image_size))
    objective = VQObjective(recon=m.recon, recon_weight=m.recon_weight, vq_weight=m.vq_weight,
                            perceptual_weight=m.perceptual_weight, perceptual_path=m.perceptual_path or None,
                            gan_weight=m.gan_weight, gan_start=m.gan_start, codebook_init=m.codebook_init,
                            restart_dead_every=m.restart_dead_every, seed=seed)
    return model, objective, None


def build_var_job(m: VARModelConfig, data: DataConfig, seed: int):
    from var.hub import load_var_tokenizer
    from var.models.var_model import VAR, VARConfig
    from var.train.objectives import VARObjective
    if not m.tokenizer:
        raise ConfigError("var: --tokenizer (a saved multi-scale tokenizer directory) is required")
    tok = load_var_tokenizer(m.tokenizer)
    if tok.image_size != data.image_size:
        raise ConfigError(f"the tokenizer works at {tok.image_size} px but --image-size is {data.image_size}")
    model = VAR(VARConfig(depth=m.depth, width=m.width, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio,
                          num_classes=data.num_classes, vocab_size=tok.vocab_size, latent_channels=tok.embed_dim,
                          patch_nums=tok.patch_nums, drop_path_rate=m.drop_path_rate,
                          cond_drop_rate=m.cond_drop_rate))
    model.init_weights(init_adaln=m.init_adaln, init_adaln_gamma=m.init_adaln_gamma, init_head=m.init_head)
    return model, VARObjective(tok, label_smoothing=m.label_smoothing, seed=seed), tok


def build_ar_job(m: ARModelConfig, data: DataConfig, seed: int):
    from var.hub import load_llamagen_vq
    from var.models.gpt import GPT, GPTConfig
    from var.train.objectives import ARObjective
    if not m.tokenizer:
        raise ConfigError("ar: --tokenizer (a saved single-scale tokenizer directory) is required")
    tok = load_llamagen_vq(m.tokenizer)
    grid = data.image_size // tok.downsample
    model = GPT(GPTConfig(dim=m.dim, n_layer=m.n_layer, n_head=m.n_head, multiple_of=m.multiple_of,
                          num_classes=data.num_classes, vocab_size=tok.vocab_size, grid_size=grid,
                          token_dropout_p=m.token_dropout_p, resid_dropout_p=m.resid_dropout_p,
                          ffn_dropout_p=m.ffn_dropout_p, class_dropout_p=m.class_dropout_p))
    model.init_weights()
    return model, ARObjective(tok, label_smoothing=m.label_smoothing, seed=seed), tok


def run(command: str, data: DataConfig, m, train: TrainConfig, export_dir: str | None = None):
    """Build and train; returns the trained (EMA) model. Every rank runs this."""
    env = DistEnv.from_env()
    prepare_out_dir(train, is_main=False)  # refuse a used --out-dir before the dataset is built (deletes nothing)
    torch.manual_seed(train.seed)  # identical initial weights on every rank
    dataset = build_dataset(data)
    if hasattr(dataset, "num_classes") and data.data != "shapes":
        data = dataclasses.replace(data, num_classes=dataset.num_classes)
    if command.startswith("tokenizer"):
        model, objective, tok = build_tokenizer_job(command, m, data, train.seed)
        # schedules with fewer scales than shared phi convolutions leave some of them unused
        train = dataclasses.replace(train, find_unused_parameters=True)
    elif command == "var":
        model, objective, tok = build_var_job(m, data, train.seed)
    else:
        model, objective, tok = build_ar_job(m, data, train.seed)
    if tok is not None and data.pretokenize and not data.hflip and data.data == "shapes":
        dataset = pretokenize(tok, dataset, progress=train.progress and env.is_main)
    run_settings = {"command": command, "data": asdict(data), "model": asdict(m)}
    if getattr(m, "tokenizer", ""):  # a resume must not silently train over another tokenizer at the same path
        from var.utils.files import content_digest
        run_settings["model"]["tokenizer_sha256"] = content_digest(m.tokenizer)
    trainer = Trainer(model, objective, dataset, train, env, run_settings=run_settings)
    if env.is_main:
        Path(train.out_dir).mkdir(parents=True, exist_ok=True)
        run_config = {"command": command, "data": asdict(data), "model": asdict(m), "train": asdict(train)}
        (Path(train.out_dir) / "run_config.json").write_text(json.dumps(run_config, indent=2))
    t0 = time.time()
    trainer.fit()
    model = trainer.export_model()
    if env.is_main:
        from var.hub import save_pretrained
        save_pretrained(model, Path(train.out_dir) / "model")
        if export_dir:
            export_dir = Path(export_dir)
            if tok is None:
                save_pretrained(model, export_dir)
            else:
                save_pretrained(model, export_dir / "transformer")
                save_pretrained(tok, export_dir / "tokenizer")
            log.info("exported to %s", export_dir)
        log.info("trained %d steps in %.1f s", train.steps, time.time() - t0)
    trainer.close()
    return model


def read_config_file(path: str) -> dict:
    """The ``--config`` JSON (``data`` / ``model`` / ``train`` sections); a missing or malformed file is named."""
    try:
        cfg = json.loads(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"cannot read --config {path}: {e.strerror or e}") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"--config {path} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict) or set(cfg) - {"command", "data", "model", "train"}:
        raise ConfigError(f"--config {path} must be a JSON object with data / model / train sections")
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    file_config = read_config_file(args.config) if args.config else {}
    data = _build(DataConfig, args, file_config.get("data", {}))
    model_config = _build(MODEL_CONFIGS[args.command], args, file_config.get("model", {}))
    train = _build(TrainConfig, args, file_config.get("train", {}))
    run(args.command, data, model_config, train, args.export_dir)
    return 0


cli = command_line(main)

if __name__ == "__main__":
    sys.exit(cli())
