"""Training objectives. Each is called as ``loss, metrics = objective(model, batch)`` inside the trainer's
autocast region and returns a scalar loss to minimise plus a dict of float metrics (already detached).

* :class:`VQObjective` — tokenizers (multi-scale and single-scale VQ): L1/L2 reconstruction + the quantizer's
  codebook/commitment loss, optional perceptual loss (VGG-16 features, weights from a local file) and optional
  hinge GAN loss with a PatchGAN discriminator; reports codebook usage (perplexity, fraction of codes used).
* :class:`VARObjective` — next-scale teacher forcing over all scales with the original uniform 1/L token
  weighting, label smoothing and class dropout for classifier-free guidance.
* :class:`ARObjective` — next-token teacher forcing of a class-conditional GPT over single-scale VQ tokens
  with class dropout.

Randomness of an objective (class dropout) comes from its own ``torch.Generator`` seeded per rank; its state
is part of :meth:`state_dict` so a resumed run draws the same labels.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from var.errors import CheckpointError, ConfigError
from var.utils.scales import ScaleSchedule

log = logging.getLogger(__name__)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module under DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def drop_labels(labels_B: torch.Tensor, drop_rate: float, null_class: int,
                generator: torch.Generator) -> torch.Tensor:
    """Replace each label by ``null_class`` with probability ``drop_rate`` (draws from ``generator`` on CPU)."""
    if drop_rate <= 0:
        return labels_B
    drop = torch.rand(labels_B.shape[0], generator=generator) < drop_rate
    return torch.where(drop.to(labels_B.device), torch.full_like(labels_B, null_class), labels_B)


def codebook_metrics(usage_SV: torch.Tensor) -> dict[str, float]:
    """Fraction of codes used in the batch and perplexity of the code histogram (mean over scales)."""
    usage_SV = usage_SV.float().reshape(-1, usage_SV.shape[-1])
    probs = usage_SV / usage_SV.sum(dim=-1, keepdim=True).clamp_min(1)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
    used = (usage_SV.sum(0) > 0).float().mean()
    return {"code_used": used.item(), "code_perplexity": entropy.exp().mean().item()}


class Objective(nn.Module):
    """Base class: holds the per-rank generator and (optionally) extra trainable state."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.generator = torch.Generator().manual_seed(seed)

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def extra_state(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_extra_state(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def after_step(self, step: int) -> dict[str, float]:
        """Hook run after the model's optimizer step (the GAN discriminator updates here)."""
        return {}


# ---- (a) tokenizers ---------------------------------------------------------------------------------------------
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_VGG16_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in torchvision's ``features``


class VGG16Features(nn.Module):
    """VGG-16 convolutional trunk with torchvision's parameter names (``features.{i}.weight``)."""

    def __init__(self):
        super().__init__()
        layers, c_in = [], 3
        for v in _VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU(inplace=False)]
                c_in = v
        self.features = nn.Sequential(*layers)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def forward(self, images_B3HW: torch.Tensor) -> list[torch.Tensor]:
        x = ((images_B3HW.float() + 1) / 2 - self.mean) / self.std
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _VGG16_TAPS:
                taps.append(x)
            if i == _VGG16_TAPS[-1]:
                break
        return taps


class PerceptualLoss(nn.Module):
    """LPIPS-style distance: channel-normalised VGG-16 features, squared differences, averaged over layers
    (weighted per channel by ``lin{i}.model.1.weight`` when the file holds LPIPS linear heads).

    Weights come ONLY from ``weights_path`` (a torchvision ``vgg16`` state dict ``.pth``/``.safetensors``,
    optionally merged with LPIPS ``lin*`` keys); nothing is downloaded.
    """

    def __init__(self, weights_path: str | Path):
        super().__init__()
        from var.hub import read_state_dict
        path = Path(weights_path)
        if not path.exists():
            raise CheckpointError(f"perceptual-loss weights not found at {path} (they are never downloaded: "
                                  f"save torchvision's vgg16 state dict there)")
        sd = read_state_dict(path)
        self.vgg = VGG16Features()
        vgg_sd = {k: v for k, v in sd.items() if k.startswith("features.")}
        from var.hub import load_strict
        load_strict(self.vgg, vgg_sd, f"VGG-16 features ({path})")
        widths = [self.vgg.features[i - 1].out_channels for i in _VGG16_TAPS]
        self.lins = nn.ParameterList([nn.Parameter(torch.ones(1, w, 1, 1), requires_grad=False) for w in widths])
        for i in range(len(widths)):
            key = f"lin{i}.model.1.weight"
            if key in sd:
                self.lins[i].data.copy_(sd[key].view(1, -1, 1, 1))
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True):  # always frozen, always eval
        return super().train(False)

    def forward(self, x_B3HW: torch.Tensor, y_B3HW: torch.Tensor) -> torch.Tensor:
        total = x_B3HW.new_zeros((), dtype=torch.float32)
        for fx, fy, lin in zip(self.vgg(x_B3HW), self.vgg(y_B3HW), self.lins):
            fx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            fy = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + ((fx - fy).pow(2) * lin).sum(1).mean()
        return total


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator: stride-2 convs with GroupNorm and LeakyReLU, one logit per patch."""

    def __init__(self, in_channels: int = 3, width: int = 64, num_layers: int = 3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = width
        for i in range(1, num_layers):
            c_out = width * min(2 ** i, 8)
            layers += [nn.Conv2d(c, c_out, 4, 2, 1), nn.GroupNorm(min(32, c_out // 4), c_out), nn.LeakyReLU(0.2)]
            c = c_out
        layers.append(nn.Conv2d(c, 1, 3, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        return self.net(images_B3HW.float())


class VQObjective(Objective):
    """Tokenizer loss ``w_rec * rec + w_vq * vq + w_p * perceptual + w_gan * g_loss`` (GAN after ``gan_start``).

    Codebook collapse (a handful of codes used) is the usual failure of small VQ models trained from scratch, so
    by default (``codebook_init="data"``) the codebook is set from quantizer inputs of the first batch, and with
    ``restart_dead_every=N`` codes unused for N steps (summed over ranks) are re-drawn from current inputs.

    The tokenizer's ``forward(images)`` returns ``(reconstruction, vq_loss, usage)`` (both VQ tokenizers do).
    With a discriminator, :meth:`after_step` trains it on the last batch with the hinge loss; its gradients
    are all-reduced across ranks so every rank keeps identical discriminator weights.
    """

    def __init__(self, *, recon: str = "l1", recon_weight: float = 1.0, vq_weight: float = 1.0,
                 perceptual_weight: float = 0.0, perceptual_path: str | None = None, gan_weight: float = 0.0,
                 gan_start: int = 0, disc_lr: float = 1e-4, codebook_init: str = "data",
                 restart_dead_every: int = 0, seed: int = 0):
        super().__init__(seed)
        if codebook_init not in ("data", "model"):
            raise ConfigError(f"codebook_init must be 'data' or 'model', got {codebook_init!r}")
        self.codebook_init, self.restart_dead_every = codebook_init, restart_dead_every
        self._initialized = codebook_init == "model"
        self._hits: torch.Tensor | None = None
        if recon not in ("l1", "l2"):
            raise ConfigError(f"recon must be 'l1' or 'l2', got {recon!r}")
        self.recon, self.recon_weight, self.vq_weight = recon, recon_weight, vq_weight
        self.perceptual_weight, self.gan_weight, self.gan_start = perceptual_weight, gan_weight, gan_start
        self.perceptual = None
        if perceptual_weight > 0:
            if not perceptual_path:
                raise ConfigError("perceptual_weight > 0 needs perceptual_path (a local VGG-16 weights file)")
            self.perceptual = PerceptualLoss(perceptual_path)
        self.discriminator = self.disc_opt = None
        if gan_weight > 0:
            self.discriminator = PatchDiscriminator()
            self.disc_opt = torch.optim.Adam(self.discriminator.parameters(), lr=disc_lr, betas=(0.5, 0.9))
        self._last = None
        self._step = 0

    def forward(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict[str, float]]:
        images, _ = batch
        if not self._initialized:
            self._reset_codes(unwrap(model), images, dead=None)
            self._initialized = True
        self._tok, self._images = unwrap(model), images.detach()
        recon, vq_loss, usage = model(images)
        hits = usage.detach().float().reshape(-1, usage.shape[-1]).sum(0)
        self._hits = hits if self._hits is None else self._hits + hits
        recon = recon.float()
        err = recon - images.float()
        rec = err.abs().mean() if self.recon == "l1" else err.pow(2).mean()
        loss = self.recon_weight * rec + self.vq_weight * vq_loss
        with torch.no_grad():
            mse = F.mse_loss(recon.clamp(-1, 1), images.float())
        metrics = {"rec": rec.detach().item(), "vq": float(vq_loss.detach()), "psnr": (10 * torch.log10(4 / mse.clamp_min(1e-10))).item(),
                   **codebook_metrics(usage)}
        if self.perceptual is not None:
            p = self.perceptual(recon, images)
            loss = loss + self.perceptual_weight * p
            metrics["perceptual"] = p.item()
        if self.discriminator is not None:
            self._last = (images.detach(), recon.detach())
            if self._step >= self.gan_start:
                self.discriminator.requires_grad_(False)
                g = -self.discriminator(recon).mean()
                self.discriminator.requires_grad_(True)
                loss = loss + self.gan_weight * g
                metrics["g_loss"] = g.item()
        return loss, metrics

    # -- codebook maintenance: data-dependent init and dead-code restarts ---------------------------------------
    @staticmethod
    def quantizer_inputs(tok: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """The vectors the quantizer assigns to codes ``[N, C]``: every scale's residual (multi-scale) or the
        normalised latent (single-scale)."""
        q = tok.quantize
        f = tok.encode_latent(images).float()
        if hasattr(q, "patch_nums"):  # multi-scale residual quantizer
            from var.tokenizers.multiscale_quantizer import area_resize
            f_rest, rows = f.clone(), []
            for si, pn in enumerate(q.patch_nums):
                z = area_resize(f_rest, pn).permute(0, 2, 3, 1).reshape(-1, f.shape[1])
                rows.append(z)
                idx = q.nearest_code(z).view(f.shape[0], pn, pn)
                f_rest = f_rest - q._scale_contribution(si, q.embed_indices(idx))
            return torch.cat(rows)
        z = q._prepare(f)
        return z.reshape(-1, z.shape[-1])

    @torch.no_grad()
    def _reset_codes(self, tok: nn.Module, images: torch.Tensor, dead: torch.Tensor | None) -> int:
        """Set codes (all when ``dead`` is None, else the ``dead`` mask) to randomly drawn quantizer inputs of
        this batch plus a little noise; rank 0's values are broadcast so all ranks agree."""
        weight = tok.quantize.embedding.weight
        vectors = self.quantizer_inputs(tok, images.to(weight.device))
        rows = torch.arange(weight.shape[0], device=weight.device) if dead is None else dead.nonzero().flatten()
        if len(rows) == 0:
            return 0
        pick = torch.randint(0, len(vectors), (len(rows),), generator=self.generator).to(vectors.device)
        noise = torch.randn(len(rows), vectors.shape[1], generator=self.generator).to(vectors.device)
        new = vectors[pick] + 0.01 * vectors.std() * noise
        weight.data[rows] = new.to(weight.dtype)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast(weight.data, src=0)
        return len(rows)

    def after_step(self, step: int) -> dict[str, float]:
        self._step = step + 1
        metrics = {}
        if self.restart_dead_every > 0 and self._step % self.restart_dead_every == 0 and self._hits is not None:
            hits = self._hits
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(hits)
            tok = self._tok
            metrics["codes_restarted"] = float(self._reset_codes(tok, self._images, hits == 0))
            self._hits = None
        return metrics | self._disc_step(step)

    def _disc_step(self, step: int) -> dict[str, float]:
        if self.discriminator is None or self._last is None or step < self.gan_start:
            return {}
        real, fake = self._last
        self._last = None
        d_loss = F.relu(1 - self.discriminator(real)).mean() + F.relu(1 + self.discriminator(fake)).mean()
        self.disc_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            for p in self.discriminator.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad.div_(world)
        self.disc_opt.step()
        return {"d_loss": d_loss.item()}

    def extra_state(self) -> dict:
        state = super().extra_state() | {"step": self._step, "initialized": self._initialized,
                                         "hits": self._hits}
        if self.discriminator is not None:
            state["discriminator"] = self.discriminator.state_dict()
            state["disc_opt"] = self.disc_opt.state_dict()
        return state

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        self._step = int(state.get("step", 0))
        self._initialized = bool(state.get("initialized", True))
        self._hits = state.get("hits")
        if self.discriminator is not None:
            if "discriminator" not in state:
                raise CheckpointError("the checkpoint has no discriminator but this run trains with a GAN loss")
            self.discriminator.load_state_dict(state["discriminator"])
            self.disc_opt.load_state_dict(state["disc_opt"])


# ---- (b) VAR -----------------------------------------------------------------------------------------------------
def scale_loss_weights(patch_nums: Sequence[int]) -> torch.Tensor:
    """The original VAR token weighting: uniform ``1 / L`` over all ``L`` tokens of all scales ``[1, L]``."""
    L = ScaleSchedule(patch_nums).seq_len
    return torch.full((1, L), 1.0 / L)


def split_scales(gt_BL: torch.Tensor, patch_nums: Sequence[int]) -> list[torch.Tensor]:
    """Concatenated tokens ``[B, L]`` -> one ``[B, pn, pn]`` map per scale."""
    return ScaleSchedule(patch_nums).split(gt_BL)


class VARObjective(Objective):
    """Teacher forcing of a VAR model over all scales of a frozen multi-scale tokenizer.

    ``batch = (images [B, 3, S, S] in [-1, 1] | tokens [B, L] int64, labels [B])``. Loss = sum over tokens of
    ``CE(label_smoothing) * 1/L`` averaged over the batch (= mean CE, as in the original trainer). Labels are
    replaced by the null class with probability ``cond_drop_rate`` (default: the model config's).
    """

    def __init__(self, tokenizer: nn.Module, *, label_smoothing: float = 0.0, cond_drop_rate: float | None = None,
                 seed: int = 0):
        super().__init__(seed)
        self.tokenizer = tokenizer.eval().requires_grad_(False)
        self.label_smoothing, self.cond_drop_rate = label_smoothing, cond_drop_rate

    def tokens(self, batch_input: torch.Tensor) -> list[torch.Tensor]:
        if batch_input.dtype == torch.long:
            return split_scales(batch_input, self.tokenizer.patch_nums)
        return self.tokenizer.encode(batch_input)

    def forward(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict[str, float]]:
        inputs, labels = batch
        core = unwrap(model)
        with torch.no_grad():
            idx_list = self.tokens(inputs)
            gt_BL = torch.cat([idx.flatten(1) for idx in idx_list], dim=1)
            x_BLCv = self.tokenizer.teacher_forcing_input(idx_list)
        rate = core.config.cond_drop_rate if self.cond_drop_rate is None else self.cond_drop_rate
        labels = drop_labels(labels, rate, core.null_class, self.generator)
        logits_BLV = model(labels, x_BLCv).float()
        B, L, V = logits_BLV.shape
        ce_BL = F.cross_entropy(logits_BLV.reshape(-1, V), gt_BL.reshape(-1), label_smoothing=self.label_smoothing,
                                reduction="none").view(B, L)
        weights = scale_loss_weights(core.config.patch_nums).to(ce_BL.device)
        loss = ce_BL.mul(weights).sum(dim=-1).mean()
        with torch.no_grad():
            last = core.config.schedule.lengths[-1]
            pred = logits_BLV.argmax(-1)
            metrics = {"acc": (pred == gt_BL).float().mean().item(),
                       "acc_tail": (pred[:, -last:] == gt_BL[:, -last:]).float().mean().item()}
            if self.label_smoothing:
                metrics["ce"] = F.cross_entropy(logits_BLV.reshape(-1, V), gt_BL.reshape(-1)).item()
        return loss, metrics


# ---- (c) AR GPT --------------------------------------------------------------------------------------------------
class ARObjective(Objective):
    """Next-token cross-entropy of a class-conditional GPT over a frozen single-scale VQ tokenizer.

    ``batch = (images | tokens [B, N] int64, labels)``. The model's teacher-forcing forward
    ``model(labels [B], tokens [B, N]) -> logits [B, N, V]`` (:class:`var.models.gpt.GPT`) predicts token ``i``
    from the class token and tokens ``< i``. Labels are dropped to the null class with ``cond_drop_rate``
    (default: the model config's ``class_dropout_p``).
    """

    def __init__(self, tokenizer: nn.Module, *, label_smoothing: float = 0.0, cond_drop_rate: float | None = None,
                 seed: int = 0):
        super().__init__(seed)
        self.tokenizer = tokenizer.eval().requires_grad_(False)
        self.label_smoothing, self.cond_drop_rate = label_smoothing, cond_drop_rate

    def forward(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict[str, float]]:
        inputs, labels = batch
        core = unwrap(model)
        with torch.no_grad():
            tokens_BN = inputs if inputs.dtype == torch.long else self.tokenizer.encode(inputs)[0].flatten(1)
        rate = core.config.class_dropout_p if self.cond_drop_rate is None else self.cond_drop_rate
        labels = drop_labels(labels, rate, core.null_class, self.generator)
        logits_BNV = model(labels, tokens_BN).float()
        V = logits_BNV.shape[-1]
        loss = F.cross_entropy(logits_BNV.reshape(-1, V), tokens_BN.reshape(-1), label_smoothing=self.label_smoothing)
        with torch.no_grad():
            metrics = {"acc": (logits_BNV.argmax(-1) == tokens_BN).float().mean().item()}
        return loss, metrics
