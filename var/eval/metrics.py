"""FID, KID and precision/recall on features, plus the standard Inception metrics through torch-fidelity.

Two evaluators, never mixed in one table (every result carries ``evaluator``):

* ``torch-fidelity`` (optional extra ``pip install var-toolkit[eval]``): FID, IS, KID, precision/recall on the
  TF-ported Inception-v3 that the ADM suite also uses. :func:`choose_evaluator` takes it only when it imports and
  Inception weights are at hand (``weights_path`` or the download cache); :func:`inception_weights` checks them. Published VAR numbers come from OpenAI's ADM evaluator on the packed ``.npz``
  (see :mod:`var.eval.export`); torch-fidelity agrees with it closely but is not the same program.
* ``offline`` (:func:`offline_metrics`): the same formulas on the features of an offline extractor
  (:mod:`var.eval.features`); FID-style numbers that need no download, comparable only with themselves.

Formulas: Frechet distance ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` (Heusel et al. 2017); KID = unbiased
MMD^2 with the cubic polynomial kernel ``(x.y / d + 1)^3`` averaged over random subsets (Binkowski et al. 2018);
precision/recall = fraction of one set inside the union of the other set's k-NN balls (Kynkaanniemi et al. 2019).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from var.errors import ConfigError

log = logging.getLogger(__name__)


# ---- feature-space formulas -----------------------------------------------------------------------------------
def feature_statistics(feats_ND: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` (float64) of features ``[N, D]``, N >= 2."""
    feats_ND = np.asarray(feats_ND, dtype=np.float64)
    if feats_ND.ndim != 2 or feats_ND.shape[0] < 2:
        raise ConfigError(f"need features [N >= 2, D], got shape {feats_ND.shape}")
    return feats_ND.mean(axis=0), np.cov(feats_ND, rowvar=False)


def _psd_sqrt(mat: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((mat + mat.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between two Gaussians.

    ``tr((S1 S2)^(1/2))`` is computed as the sum of the square roots of the eigenvalues of the symmetric PSD matrix
    ``S1^(1/2) S2 S1^(1/2)`` (same eigenvalues as ``S1 S2``), which needs no scipy and never goes complex.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ConfigError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, "
                          f"sigma {sigma1.shape} vs {sigma2.shape}")
    for name, sigma in (("first", sigma1), ("second", sigma2)):
        _check_psd(sigma, name)
    s1_half = _psd_sqrt(sigma1)
    middle = s1_half @ sigma2 @ s1_half
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)
    scale = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2))
    if value < -_PSD_RTOL * max(scale, 1.0):  # cannot happen for valid statistics: never shown as 0
        raise ConfigError(f"the Frechet distance came out negative ({value:.6g}): the statistics are inconsistent")
    # a negative value within rounding of 0 (identical statistics) is reported as 0
    return max(value, 0.0)


_PSD_RTOL = 1e-6


def _check_psd(sigma: np.ndarray, name: str) -> None:
    """A covariance must be symmetric positive semi-definite (up to rounding), else the FID is meaningless."""
    if not np.isfinite(sigma).all():
        raise ConfigError(f"the {name} covariance holds NaN/inf values")
    eig = np.linalg.eigvalsh((sigma + sigma.T) / 2)
    if eig.min() < -_PSD_RTOL * max(abs(eig).max(), 1e-12) or not np.allclose(sigma, sigma.T, rtol=1e-5,
                                                                                atol=1e-8 * abs(sigma).max()):
        raise ConfigError(f"the {name} covariance is not symmetric positive semi-definite (smallest eigenvalue "
                          f"{eig.min():.4g}): wrong or corrupt statistics file?")


def frechet_distance_features(feats1: np.ndarray, feats2: np.ndarray) -> float:
    """Frechet distance between the Gaussian fits of two feature sets ``[N, D]``."""
    return frechet_distance(*feature_statistics(feats1), *feature_statistics(feats2))


def kid_subset_size(n1: int, n2: int, subset_size: int = 1000) -> int:
    """Subsets of at most half the smaller set: subsets as large as a set are all that set (std 0)."""
    return max(2, min(subset_size, min(n1, n2) // 2))


def kernel_distance(feats1: np.ndarray, feats2: np.ndarray, *, num_subsets: int = 100, subset_size: int = 1000,
                    seed: int = 0) -> tuple[float, float]:
    """KID: mean and std over random subsets of the unbiased MMD^2 with kernel ``(x.y / D + 1)^3``. Subsets hold
    :func:`kid_subset_size` samples (at most half the smaller set), so the std measures real variation."""
    f1, f2 = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
    if min(len(f1), len(f2)) < 4:
        raise ConfigError("KID needs at least 4 samples in each set")
    m = kid_subset_size(len(f1), len(f2), subset_size)
    rng, d = np.random.RandomState(seed), f1.shape[1]
    values = []
    for _ in range(num_subsets):
        x, y = f1[rng.choice(len(f1), m, replace=False)], f2[rng.choice(len(f2), m, replace=False)]
        kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
        off = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        values.append(off - 2 * kxy.mean())
    return float(np.mean(values)), float(np.std(values))


def _kth_neighbour_radii(feats_ND: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Distance of every point to its k-th nearest neighbour within the set (itself excluded)."""
    radii = []
    for i in range(0, len(feats_ND), chunk):
        dist = torch.cdist(feats_ND[i:i + chunk], feats_ND)
        radii.append(dist.kthvalue(k + 1, dim=1).values)  # the 1st smallest is the point itself (0)
    return torch.cat(radii)


def _coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int) -> float:
    """Fraction of ``points`` inside at least one ball ``(centre, radius)``."""
    inside = 0
    for i in range(0, len(points), chunk):
        dist = torch.cdist(points[i:i + chunk], centres)
        inside += (dist <= radii[None]).any(dim=1).sum().item()
    return inside / len(points)


def precision_recall(real_feats: np.ndarray, fake_feats: np.ndarray, *, k: int = 3,
                     chunk: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (k-NN manifolds): precision = share of fake samples inside the real manifold,
    recall = share of real samples inside the fake manifold."""
    real = torch.as_tensor(np.asarray(real_feats), dtype=torch.float64)
    fake = torch.as_tensor(np.asarray(fake_feats), dtype=torch.float64)
    if min(len(real), len(fake)) <= k:
        raise ConfigError(f"precision/recall with k={k} needs more than {k} samples per set")
    real_r, fake_r = _kth_neighbour_radii(real, k, chunk), _kth_neighbour_radii(fake, k, chunk)
    return _coverage(fake, real, real_r, chunk), _coverage(real, fake, fake_r, chunk)


# ---- uncertainty ----------------------------------------------------------------------------------------------
# Below this many samples per set the 95% intervals of the offline numbers are wide enough that rankings of close
# methods (e.g. cache policies at similar budgets) are noise: results carry a warning.
MIN_RELIABLE_SAMPLES = 1000


def bootstrap_interval(statistic, feats1: np.ndarray, feats2: np.ndarray, *, num_resamples: int = 50,
                       seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Bias-corrected percentile bootstrap interval of ``statistic(feats1, feats2)`` (both sets resampled with
    replacement). Duplicated samples inflate a Frechet distance, so the resampled values are shifted by their
    mean's offset from the estimate (the bootstrap bias estimate) before the percentiles are read."""
    rng = np.random.default_rng(seed)
    estimate = statistic(feats1, feats2)
    values = np.array([statistic(feats1[rng.integers(0, len(feats1), len(feats1))],
                                 feats2[rng.integers(0, len(feats2), len(feats2))]) for _ in range(num_resamples)])
    values -= values.mean() - estimate
    tail = 100 * (1 - level) / 2
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))


def kid_interval(feats1: np.ndarray, feats2: np.ndarray, *, num_subsets: int = 100, subset_size: int = 1000,
                 seed: int = 0) -> tuple[float, float, float, tuple[float, float]]:
    """KID mean, subset std and a 95% interval of the full-set estimate. The unbiased MMD^2 is a U-statistic
    (variance ~ 1/size), so the std over subsets of ``m`` samples is scaled by ``sqrt(m / n)`` to the full sets;
    resampling with replacement would put duplicate pairs into the unbiased sums and is not used."""
    mean, std = kernel_distance(feats1, feats2, num_subsets=num_subsets, subset_size=subset_size, seed=seed)
    m, n = kid_subset_size(len(feats1), len(feats2), subset_size), min(len(feats1), len(feats2))
    half = 1.96 * std * (m / n) ** 0.5
    return mean, std, (mean - half, mean + half)


def proportion_interval(fraction: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion measured on ``n`` samples (precision/recall; manifolds held fixed)."""
    centre = (fraction + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((fraction * (1 - fraction) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def extractor_key(name: str) -> str:
    """``"random-conv(seed=0,...)"`` -> ``"random_conv"``: the extractor's kind, for metric keys."""
    kind = name.split("(")[0].split(":")[-1]
    return "".join(c if c.isalnum() else "_" for c in kind).strip("_").lower()


# ---- the offline evaluator ------------------------------------------------------------------------------------
def offline_metrics(samples, reference, *, extractor=None, k: int = 3, kid_subset_size: int = 1000,
                    batch_size: int = 256, num_resamples: int = 50) -> dict:
    """Frechet distance, kernel distance and precision/recall of ``samples`` against ``reference`` on offline
    features, each with a 95% interval (``<key>_ci95``).

    The keys name the extractor (``fd_random_conv``, ``kd_offline_classifier`` ...): these are not Inception FID
    or KID and are comparable only with numbers of the same extractor. ``samples`` / ``reference``: uint8
    ``[N, H, W, 3]`` arrays, float ``[N, 3, H, W]`` tensors in [0, 1], or precomputed feature arrays ``[N, D]``
    (float). Below :data:`MIN_RELIABLE_SAMPLES` samples a ``warning`` is added (and logged).
    """
    from var.eval.features import extract_features, load_offline_extractor
    extractor = extractor if extractor is not None else load_offline_extractor("auto")

    def feats(x):
        if isinstance(x, np.ndarray) and x.ndim == 2:
            return x.astype(np.float64)
        return extract_features(extractor, x, batch_size=batch_size)

    f_s, f_r = feats(samples), feats(reference)
    key = extractor_key(extractor.name)
    kid_mean, kid_std, kid_ci = kid_interval(f_s, f_r, subset_size=kid_subset_size)
    precision, recall = precision_recall(f_r, f_s, k=k)
    result = {f"fd_{key}": frechet_distance_features(f_s, f_r),
              f"fd_{key}_ci95": bootstrap_interval(_frechet_of_features, f_s, f_r, num_resamples=num_resamples),
              f"kd_{key}": kid_mean, f"kd_{key}_std": kid_std, f"kd_{key}_ci95": kid_ci,
              "precision": precision, "precision_ci95": proportion_interval(precision, len(f_s)),
              "recall": recall, "recall_ci95": proportion_interval(recall, len(f_r)),
              "num_samples": len(f_s), "num_reference": len(f_r), "evaluator": f"offline:{extractor.name}"}
    if min(len(f_s), len(f_r)) < MIN_RELIABLE_SAMPLES:
        result["warning"] = (f"only {min(len(f_s), len(f_r))} samples (< {MIN_RELIABLE_SAMPLES}): differences "
                             f"inside the 95% intervals are noise; do not rank methods on them")
        log.warning(result["warning"])
    return result


def _frechet_of_features(f1: np.ndarray, f2: np.ndarray) -> float:
    return frechet_distance(f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False))


# ---- torch-fidelity (Inception) -------------------------------------------------------------------------------
# torch-fidelity's inception-v3-compat weights: the name its download (torch.hub) caches them under
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_EXTRACTOR = "inception-v3-compat"  # torch-fidelity's TF-ported Inception-v3 (the ADM suite's network)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # what torch-fidelity reads from a folder


def _import_torch_fidelity():
    try:
        import torch_fidelity
    except ImportError as e:
        raise ConfigError("torch-fidelity is not installed: pip install 'var-toolkit[eval]' (or torch-fidelity); "
                          "use `var-eval metrics --evaluator offline` for the download-free evaluator") from e
    except Exception as e:  # torchvision built for another torch fails at import ("operator torchvision::nms ...")
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(f"torch-fidelity does not import ({type(e).__name__}: {first}): torchvision must be the "
                          f"build made for torch {torch.__version__} (docs/install.md, 'Evaluation extra')") from e
    return torch_fidelity


def cached_inception_weights() -> Path | None:
    """The Inception weights in torch-fidelity's download cache (``torch.hub.get_dir()/checkpoints``), if there."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    return path if path.is_file() else None


def choose_evaluator(requested: str = "auto", weights_path: str | os.PathLike | None = None) -> str:
    """``"torch-fidelity"`` or ``"offline"`` for ``requested`` in ``auto`` / ``torch-fidelity`` / ``offline``.

    ``auto`` takes torch-fidelity only when it imports and Inception weights are at hand (``weights_path`` or the
    download cache); otherwise it falls back to the offline evaluator with one log line saying why, instead of a
    download that fails on a machine without network. An explicit ``torch-fidelity`` must import (ConfigError)."""
    if requested not in ("auto", "torch-fidelity", "offline"):
        raise ConfigError(f"unknown evaluator {requested!r}: use auto, torch-fidelity or offline")
    if requested == "offline":
        return "offline"
    if requested == "torch-fidelity":
        _import_torch_fidelity()
        return "torch-fidelity"
    try:
        _import_torch_fidelity()
    except ConfigError as e:
        log.info("evaluator: offline (%s)", str(e).split(":")[0])
        return "offline"
    if weights_path is None and cached_inception_weights() is None:
        log.warning("evaluator: offline, not torch-fidelity: no --inception-weights given and no cached Inception "
                    "weights in %s (pass --inception-weights FILE, or --evaluator torch-fidelity to download them)",
                    Path(torch.hub.get_dir()) / "checkpoints")
        return "offline"
    return "torch-fidelity"


def inception_weights(weights_path: str | os.PathLike | None = None) -> str:
    """A checked local Inception weights file: ``weights_path``, else the cached download, else downloaded once
    into the cache (a failed download is one ConfigError line). The file must load as plain tensors
    (``weights_only``): torch-fidelity unpickles it without that guard."""
    if weights_path is None:
        weights_path = cached_inception_weights() or _download_inception_weights()
    path = Path(weights_path)
    if not path.is_file():
        raise ConfigError(f"Inception weights not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle with code in it, or not a torch file at all
        raise ConfigError(f"{path} is not a plain state dict of Inception weights ({type(e).__name__})") from e
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ConfigError(f"{path} is not a state dict (name -> tensor) of Inception weights")
    return str(path)


def _download_inception_weights() -> Path:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    target = Path(torch.hub.get_dir()) / "checkpoints" / Path(URL_INCEPTION_V3).name
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading the Inception weights to %s", target)
    try:
        torch.hub.download_url_to_file(URL_INCEPTION_V3, str(target), progress=False)
    except OSError as e:  # URLError, timeouts, a full disk: one line, not a traceback
        raise ConfigError(f"could not download the Inception weights ({getattr(e, 'reason', e)}): pass "
                          f"--inception-weights FILE (a local copy of {Path(URL_INCEPTION_V3).name}) or use "
                          f"--evaluator offline") from e
    return target


def count_images(folder: str | os.PathLike) -> int | None:
    """Images that torch-fidelity finds in ``folder`` (recursively); None for a non-folder input (a dataset name)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    return sum(1 for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def fidelity_metrics(input1: str | os.PathLike, input2: str | os.PathLike | None = None, *,
                     weights_path: str | os.PathLike | None = None, cuda: bool | None = None, isc: bool = True,
                     fid: bool = True, kid: bool = True, prc: bool = True, input2_cache_name: str | None = None,
                     kid_subset_size: int = 1000, isc_splits: int = 10, batch_size: int = 64,
                     verbose: bool = False) -> dict:
    """FID / IS / KID / precision / recall via ``torch_fidelity.calculate_metrics`` on two image folders (or a
    folder and a registered dataset name). ``input2_cache_name`` caches the reference features between calls.
    Small folders get smaller KID subsets and fewer IS splits (torch-fidelity refuses KID subsets larger than a
    set and returns NaN for IS splits without images)."""
    tf = _import_torch_fidelity()
    if input2 is None:
        fid = kid = prc = False
    n1, n2 = count_images(input1), count_images(input2) if input2 is not None else None
    counts = [n for n in (n1, n2) if n]
    if kid and counts and min(counts) < kid_subset_size:
        kid_subset_size = min(counts)
        log.info("KID subsets of %d images (the smaller set)", kid_subset_size)
    if isc and n1 and n1 < 2 * isc_splits:
        isc_splits = max(1, n1 // 2)  # at least two images per split
        log.info("Inception score over %d splits (%d images)", isc_splits, n1)
    cuda = torch.cuda.is_available() if cuda is None else cuda
    # one extractor for every metric: torch-fidelity's default for precision/recall is VGG-16, which would load
    # the Inception weights file (and fail) or download VGG weights
    kwargs = dict(input1=str(input1), cuda=cuda, isc=isc, fid=fid, kid=kid, prc=prc, verbose=verbose,
                  batch_size=batch_size, samples_find_deep=True, kid_subset_size=kid_subset_size,
                  isc_splits=isc_splits, feature_extractor=INCEPTION_EXTRACTOR, feature_extractor_weights_path=inception_weights(weights_path))
    if input2 is not None:
        kwargs["input2"] = str(input2)
        if input2_cache_name:
            kwargs["input2_cache_name"] = input2_cache_name
    raw = tf.calculate_metrics(**kwargs)
    names = {"frechet_inception_distance": "fid", "inception_score_mean": "is_mean", "inception_score_std": "is_std",
             "kernel_inception_distance_mean": "kid_mean", "kernel_inception_distance_std": "kid_std",
             "precision": "precision", "recall": "recall"}
    out = {ours: float(raw[theirs]) for theirs, ours in names.items() if theirs in raw}
    out["evaluator"] = f"torch-fidelity {getattr(tf, '__version__', '?')} (inception-v3-compat)"
    return out


def inception_features(images, *, weights_path=None, device=None, batch_size: int = 64) -> np.ndarray:
    """Pool-3 (2048-d) features of uint8 images ``[N, H, W, 3]`` with torch-fidelity's Inception-v3."""
    _import_torch_fidelity()
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    net = FeatureExtractorInceptionV3(INCEPTION_EXTRACTOR, ["2048"],
                                      feature_extractor_weights_path=inception_weights(weights_path)).to(device)
    feats = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = torch.as_tensor(np.asarray(images[i:i + batch_size])).permute(0, 3, 1, 2).contiguous().to(device)
            feats.append(net(x)[0].double().cpu().numpy())
    return np.concatenate(feats)


def load_reference_statistics(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``mu``/``sigma`` from a statistics ``.npz`` (the ADM reference batches carry them, as do files written by
    :func:`save_reference_statistics`)."""
    with np.load(path) as data:
        if "mu" not in data or "sigma" not in data:
            raise ConfigError(f"{path} has no 'mu'/'sigma' arrays (keys: {sorted(data.keys())})")
        return data["mu"].astype(np.float64), data["sigma"].astype(np.float64)


def save_reference_statistics(feats_ND: np.ndarray, path: str | os.PathLike, evaluator: str) -> Path:
    """Write ``mu``, ``sigma`` and the evaluator name of a feature set to ``path`` (``.npz``)."""
    from var.utils.files import atomic_path
    mu, sigma = feature_statistics(feats_ND)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: savez would append .npz to a name
        np.savez(f, mu=mu, sigma=sigma, evaluator=np.array(evaluator))
    return Path(path)


def fid_against_statistics(feats_ND: np.ndarray, stats_path: str | os.PathLike, evaluator: str | None = None) -> float:
    """Frechet distance of a feature set to precomputed ``mu``/``sigma`` (features and file must share the
    extractor: Inception pool-3 for the ADM reference batches). A file that names its evaluator must name
    ``evaluator`` when one is given."""
    with np.load(stats_path) as data:
        stored = str(data["evaluator"]) if "evaluator" in data else None
    if evaluator is not None and stored is not None and stored != evaluator:
        raise ConfigError(f"{stats_path} holds statistics of {stored!r}, not of {evaluator!r}")
    mu_ref, sigma_ref = load_reference_statistics(stats_path)
    return frechet_distance(*feature_statistics(feats_ND), mu_ref, sigma_ref)


def format_metrics(result: dict) -> str:
    """One line per number, each followed by the evaluator that produced it."""
    evaluator = result.get("evaluator", "?")
    lines = []
    for key, value in result.items():
        if key == "evaluator" or key.endswith("_ci95"):
            continue
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        if f"{key}_ci95" in result:
            lo, hi = result[f"{key}_ci95"]
            shown += f" (95% CI {lo:.4f} .. {hi:.4f})"
        lines.append(f"{key:>14s}: {shown}   [{evaluator}]")
    return "\n".join(lines)
