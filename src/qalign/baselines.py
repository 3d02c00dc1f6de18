"""Classical no-reference IQA baselines: BRISQUE, NIQE and PIQE.

All three score LOWER for BETTER images (``lower_is_better = True``); :func:`qalign.evaluate.evaluate`
takes ``model_lower_is_better=True`` for them. Each class has ``name``, ``lower_is_better``,
``score(image) -> float`` and ``score_many(images) -> list[float]``; an image is a PIL image, a
path, or a uint8 numpy array (H x W gray or H x W x 3 RGB).

How close each one is to its reference (details in each class):

* BRISQUE wraps OpenCV contrib's ``cv2.quality.QualityBRISQUE`` with the LIVE-trained model files
  that OpenCV contrib ships (``brisque_model_live.yml`` / ``brisque_range_live.yml``; here in
  ``baselines_data/``, the model gzipped). It is OpenCV's BRISQUE, not MATLAB's: OpenCV's own test
  expects 9.75448 on ``RubberWhale1.png`` and we get 9.75564 on the copy of that image in Debian's
  opencv-doc (the OpenCV test tolerance is 1e-3; the copies may differ). OpenCV's documentation
  reports SROCC -0.8424 on TID2008 for this model against -0.8354 for the original release.
  Needs ``opencv-contrib-python-headless`` (``cv2.quality``); a clear error otherwise.
* NIQE is a numpy/scipy re-implementation of the LIVE release (Mittal et al. 2013,
  ``computequality.m``: 96x96 blocks, two scales, MATLAB bicubic anti-aliased ``imresize(., 0.5)``,
  MATLAB ``rgb2gray``) with the official pristine model (``mu_prisparam``/``cov_prisparam`` as
  shipped by BasicSR 1.4.2 in ``niqe_pris_params.npz``; LIVE licence in baselines_data/README.md).
  It agrees with BasicSR's NIQE (which its authors report as 5.7295 vs MATLAB 5.7296 on
  baboon.png) to about 1e-3 on the test images we compared (see tests/test_baselines.py); we have
  no MATLAB here to compare with directly.
* PIQE is a numpy re-implementation from the paper (Venkatanath N et al., NCC 2015) and MATLAB's
  documented algorithm: 16x16 blocks, activity threshold 0.1, edge segments of 6 pixels with a
  0.1 std threshold, centre/surround noise test, ``(sum + 1) / (N_active + 1) * 100``. It agrees with
  ``pypiqe`` 1.2 (a port of MATLAB's ``piqe`` that states it was tested against MATLAB) to about
  1e-6 on the same grayscale input (see the tests); no MATLAB here to compare with directly.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from scipy import ndimage, special

__all__ = ["BRISQUE", "NIQE", "PIQE", "BASELINES", "get_baseline", "rgb2gray_matlab", "imresize_matlab"]

_DATA = "baselines_data"


def _data_file(name: str) -> Path:
    """A file of qalign/baselines_data (package data; OpenCV needs a real path, so no zip imports)."""
    return Path(__file__).resolve().parent / _DATA / name


# --------------------------------------------------------------------------------------------
# image input


def _to_array(image: Any) -> np.ndarray:
    """uint8-like array, H x W (gray) or H x W x 3 (RGB), from a PIL image, a path or an array."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as im:
            return _to_array(im)
    if isinstance(image, Image.Image):
        if image.mode in ("L", "1", "P;L"):
            return np.asarray(image.convert("L"))
        if image.mode in ("I;16", "I;16B", "I;16L"):
            return np.round(np.asarray(image, dtype=np.float64) / 257.0).astype(np.uint8)
        if image.mode in ("I", "F"):
            arr = np.asarray(image, dtype=np.float64)
            top = arr.max()
            return np.round(arr * (255.0 / top)).astype(np.uint8) if top > 0 else arr.astype(np.uint8)
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., :3]
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
        raise ValueError(f"expected an H x W or H x W x 3 image, got shape {arr.shape}")
    return arr


def rgb2gray_matlab(arr: np.ndarray) -> np.ndarray:
    """MATLAB ``rgb2gray`` of a uint8 RGB image (its coefficients, rounding half away from zero),
    as float64 in 0..255. Gray input is returned as float64 unchanged."""
    arr = np.asarray(arr)
    if arr.ndim == 2:
        return arr.astype(np.float64)
    rgb = arr.astype(np.float64)
    y = 0.298936021293775 * rgb[..., 0] + 0.587043074451121 * rgb[..., 1] + 0.114020904255103 * rgb[..., 2]
    if np.issubdtype(arr.dtype, np.integer):
        y = np.floor(y + 0.5)
    return y


# --------------------------------------------------------------------------------------------
# MATLAB-compatible helpers


def _cubic(x: np.ndarray) -> np.ndarray:
    ax = np.abs(x)
    ax2, ax3 = ax * ax, ax * ax * ax
    return ((1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1)
            + (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1) & (ax <= 2)))


def _resize_weights(in_len: int, out_len: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """MATLAB imresize's contributions (bicubic, anti-aliased when shrinking, symmetric edges)."""
    width = 4.0 / scale if scale < 1 else 4.0
    x = np.arange(1, out_len + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1.0 - 1.0 / scale)
    left = np.floor(u - width / 2.0)
    taps = int(math.ceil(width)) + 2
    ind = left[:, None] + np.arange(taps)[None, :]
    d = u[:, None] - ind
    w = scale * _cubic(scale * d) if scale < 1 else _cubic(d)
    w = w / w.sum(axis=1, keepdims=True)
    mirror = np.concatenate([np.arange(1, in_len + 1), np.arange(in_len, 0, -1)])
    ind = mirror[np.mod(ind - 1, mirror.size).astype(np.int64)] - 1
    keep = np.any(w != 0, axis=0)
    return w[:, keep], ind[:, keep]


def imresize_matlab(img: np.ndarray, scale: float) -> np.ndarray:
    """MATLAB ``imresize(img, scale)`` (bicubic, antialiasing on) for a 2-D float image."""
    img = np.asarray(img, dtype=np.float64)
    out = img
    for axis in (0, 1):  # MATLAB resizes dimension 1 first when both scales are equal
        n_in = out.shape[axis]
        n_out = int(math.ceil(n_in * scale))
        w, ind = _resize_weights(n_in, n_out, scale)
        moved = np.moveaxis(out, axis, 0)
        acc = np.zeros((n_out,) + moved.shape[1:], dtype=np.float64)
        for k in range(w.shape[1]):
            acc += w[:, k, None] * moved[ind[:, k]]
        out = np.moveaxis(acc, 0, axis)
    return out


@functools.lru_cache(maxsize=None)
def _gaussian_window(size: int = 7, sigma: float = 7.0 / 6.0) -> np.ndarray:
    """MATLAB ``fspecial('gaussian', size, sigma)``."""
    r = (size - 1) / 2.0
    y, x = np.mgrid[-r:r + 1, -r:r + 1]
    h = np.exp(-(x * x + y * y) / (2.0 * sigma * sigma))
    h[h < np.finfo(np.float64).eps * h.max()] = 0
    return h / h.sum()


def _mscn(img: np.ndarray, window: np.ndarray, c: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Mean-subtracted contrast-normalised coefficients (replicate padding) and the local sigma."""
    mu = ndimage.correlate(img, window, mode="nearest")
    sigma = np.sqrt(np.abs(ndimage.correlate(img * img, window, mode="nearest") - mu * mu))
    return (img - mu) / (sigma + c), sigma


def _blocks(a: np.ndarray, bh: int, bw: int) -> np.ndarray:
    """(n_blocks, bh, bw) non-overlapping blocks, column-major block order (like MATLAB)."""
    h, w = a.shape
    r, c = h // bh, w // bw
    return a[: r * bh, : c * bw].reshape(r, bh, c, bw).transpose(2, 0, 1, 3).reshape(r * c, bh, bw)


# --------------------------------------------------------------------------------------------
# NIQE

_GAM = np.arange(0.2, 10.0 + 1e-9, 0.001)  # MATLAB 0.2:0.001:10 (9801 values)
_R_AGGD = special.gamma(2.0 / _GAM) ** 2 / (special.gamma(1.0 / _GAM) * special.gamma(3.0 / _GAM))


def _aggd(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric generalised Gaussian fit per row of x, as LIVE's NIQE ``estimateaggdparam``:
    (alpha, beta_left, beta_right); alpha by grid search over 0.2:0.001:10 (first on ties)."""
    neg, pos = x < 0, x > 0
    x2 = x * x
    with np.errstate(divide="ignore", invalid="ignore"):
        left = np.sqrt((x2 * neg).sum(axis=1) / neg.sum(axis=1))
        right = np.sqrt((x2 * pos).sum(axis=1) / pos.sum(axis=1))
        gammahat = left / right
        rhat = np.mean(np.abs(x), axis=1) ** 2 / np.mean(x2, axis=1)
        rhatnorm = rhat * (gammahat ** 3 + 1) * (gammahat + 1) / (gammahat ** 2 + 1) ** 2
    idx = np.argmin((_R_AGGD[None, :] - rhatnorm[:, None]) ** 2, axis=1)
    alpha = np.where(np.isfinite(rhatnorm), _GAM[idx], np.nan)
    with np.errstate(invalid="ignore"):
        k = np.sqrt(special.gamma(1.0 / alpha) / special.gamma(3.0 / alpha))
    return alpha, left * k, right * k


def _niqe_block_features(structdis: np.ndarray, bh: int, bw: int) -> np.ndarray:
    """NIQE's 18 features per block (LIVE ``computefeature``): AGGD of the MSCN block -> alpha,
    (beta_l + beta_r) / 2; then for the products with the block circularly shifted by (0,1), (1,0),
    (1,1), (1,-1) (MATLAB ``circshift`` inside ``blkproc``, so the shift wraps inside the block):
    alpha, (beta_r - beta_l) * G(2/alpha) / G(1/alpha), beta_l, beta_r."""
    b = _blocks(structdis, bh, bw)
    n = b.shape[0]
    alpha, bl, br = _aggd(b.reshape(n, -1))
    feats = [alpha, (bl + br) / 2.0]
    for shift in ((0, 1), (1, 0), (1, 1), (1, -1)):
        pair = (b * np.roll(b, shift=shift, axis=(1, 2))).reshape(n, -1)
        alpha, bl, br = _aggd(pair)
        with np.errstate(invalid="ignore"):
            mean = (br - bl) * (special.gamma(2.0 / alpha) / special.gamma(1.0 / alpha))
        feats += [alpha, mean, bl, br]
    return np.stack(feats, axis=1)


def _nancov_complete(x: np.ndarray) -> np.ndarray:
    """MATLAB ``nancov``: drop rows with any NaN, then the usual N-1 covariance."""
    x = x[np.all(np.isfinite(x), axis=1)]
    if x.shape[0] < 2:
        return np.full((x.shape[1], x.shape[1]), np.nan)
    return np.cov(x, rowvar=False, ddof=1)


class NIQE:
    """Natural Image Quality Evaluator (Mittal, Soundararajan, Bovik, IEEE SPL 2013).

    Follows LIVE's ``computequality.m``: gray (MATLAB ``rgb2gray``) in 0..255, cropped to a whole
    number of 96x96 blocks; at each of two scales MSCN with a 7x7 Gaussian (sigma 7/6, replicate
    edges), 18 NSS features per block (96x96, then 48x48 after MATLAB ``imresize(., 0.5)``); a
    multivariate Gaussian fitted to the image's features (``nanmean``/``nancov``) compared with the
    pristine model: ``sqrt((mu_p - mu)' pinv((S_p + S) / 2) (mu_p - mu))``. Lower is better.
    Images need at least 2 blocks (e.g. 192 x 96).
    """

    name = "niqe"
    lower_is_better = True

    def __init__(self, block_size: int = 96, params: str | os.PathLike | None = None):
        self.block_size = int(block_size)
        path = Path(params) if params is not None else _data_file("niqe_pris_params_live.npz")
        with np.load(path) as z:
            self.mu_pris = np.asarray(z["mu_pris_param"], dtype=np.float64).ravel()
            self.cov_pris = np.asarray(z["cov_pris_param"], dtype=np.float64)
        if self.mu_pris.shape != (36,) or self.cov_pris.shape != (36, 36):
            raise ValueError(f"{path}: expected a 36-vector and a 36x36 matrix")

    def features(self, image: Any) -> np.ndarray:
        """(n_blocks, 36) features of an image (scale 1 then scale 2)."""
        im = rgb2gray_matlab(_to_array(image))
        bs = self.block_size
        rows, cols = im.shape[0] // bs, im.shape[1] // bs
        if rows * cols < 2:
            raise ValueError(f"NIQE needs an image of at least two {bs}x{bs} blocks, got {im.shape[1]}x{im.shape[0]}")
        im = im[: rows * bs, : cols * bs]
        window = _gaussian_window()
        feats = []
        for scale in (1, 2):
            structdis, _ = _mscn(im, window)
            feats.append(_niqe_block_features(structdis, bs // scale, bs // scale))
            if scale == 1:
                im = imresize_matlab(im, 0.5)
        return np.concatenate(feats, axis=1)

    def score(self, image: Any) -> float:
        feat = self.features(image)
        mu = np.nanmean(feat, axis=0)
        cov = _nancov_complete(feat)
        d = self.mu_pris - mu
        inv = np.linalg.pinv((self.cov_pris + cov) / 2.0)
        return float(np.sqrt(d @ inv @ d))

    def score_many(self, images: Iterable[Any]) -> list[float]:
        return [self.score(im) for im in images]


# --------------------------------------------------------------------------------------------
# PIQE


class PIQE:
    """Perception-based Image Quality Evaluator (Venkatanath N et al., NCC 2015), in numpy.

    Follows MATLAB's ``piqe`` (Image Processing Toolbox, R2018b+): the image is padded to a
    multiple of 16 by replicating its last row/column, converted to gray (MATLAB ``rgb2gray``), put
    on a 0..255 scale the way ``round(255 * im2double(I))`` does (uint8 kept as is, 16-bit divided
    by 257, float taken as 0..1), and turned into MSCN coefficients (7x7 Gaussian, sigma 7/6,
    replicate edges, C = 1). For each 16x16 block with MSCN variance > 0.1 ("spatially active"):
    *noticeable distortion* when any 6-pixel segment of any of the four block edges has std < 0.1;
    *noise* when ``sigma > 2 beta`` with ``beta = |sigma - r| / max(sigma, r)`` and ``r`` = std of
    the two centre columns / std of the "surround". A block adds ``1 - var`` for distortion and
    ``var`` for noise (1 for both). Score ``(sum + 1) / (N_active + 1) * 100`` in [0, 100]; lower is
    better (MATLAB's scale: 0-20 excellent, 21-35 good, 36-50 fair, 51-80 poor, 81-100 bad). Stds
    are sample stds (N - 1).

    Bug-for-bug detail kept so scores match MATLAB: MATLAB removes the centre columns one after the
    other from the same matrix, so its "surround" leaves out block columns 8 and 10 (1-based) and
    keeps column 9, one of the two centre columns. We do the same.
    """

    name = "piqe"
    lower_is_better = True
    block_size = 16
    activity_threshold = 0.1
    segment_threshold = 0.1
    segment_size = 6

    @staticmethod
    def _gray_0_255(image: Any) -> np.ndarray:
        from PIL import Image

        if isinstance(image, Image.Image) and image.mode in ("I;16", "I;16B", "I;16L"):
            arr = np.asarray(image, dtype=np.float64) / 257.0
        elif isinstance(image, (str, os.PathLike)):
            with Image.open(image) as im:
                return PIQE._gray_0_255(im)
        else:
            arr = _to_array(image)
        if np.issubdtype(arr.dtype, np.floating) and arr.max(initial=0.0) <= 1.0:
            arr = arr * 255.0  # float images are taken as 0..1, like im2double
        gray = rgb2gray_matlab(arr)
        return np.round(gray)

    def maps(self, image: Any) -> dict[str, Any]:
        """Score plus per-block masks (active, noticeable artifacts, noise) on the block grid."""
        gray = self._gray_0_255(image)
        h, w = gray.shape
        n = self.block_size
        ph, pw = (-h) % n, (-w) % n
        if ph or pw:
            gray = np.pad(gray, ((0, ph), (0, pw)), mode="edge")
        mscn, _ = _mscn(gray, _gaussian_window())
        rows, cols = gray.shape[0] // n, gray.shape[1] // n
        b = mscn.reshape(rows, n, cols, n).transpose(0, 2, 1, 3).reshape(rows * cols, n, n)
        var = b.reshape(len(b), -1).var(axis=1, ddof=1)
        active = var > self.activity_threshold
        # noticeable distortion: 6-pixel segments along the four edges
        edges = np.stack([b[:, 0, :], b[:, :, n - 1], b[:, n - 1, :], b[:, :, 0]], axis=1)
        segs = np.lib.stride_tricks.sliding_window_view(edges, self.segment_size, axis=2)
        impaired = (segs.std(axis=3, ddof=1) < self.segment_threshold).any(axis=(1, 2))
        # noise: centre columns vs surround (0-based centre columns c, c + 1; surround without c, c + 2)
        c = n // 2 - 1
        centre = b[:, :, c:c + 2].reshape(len(b), -1)
        keep = np.ones(n, dtype=bool)
        keep[[c, c + 2]] = False
        surround = b[:, :, keep].reshape(len(b), -1)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = centre.std(axis=1, ddof=1) / surround.std(axis=1, ddof=1)
            ratio = np.where(np.isnan(ratio), 0.0, ratio)
            sigma = np.sqrt(var)
            beta = np.abs(sigma - ratio) / np.maximum(sigma, ratio)
            noisy = sigma > 2.0 * beta
        impaired &= active
        noisy &= active
        dist = np.sum(impaired * (1.0 - var) + noisy * var)
        n_active = int(active.sum())
        score = (dist + 1.0) / (n_active + 1.0) * 100.0
        grid = (rows, cols)
        return {"score": float(score), "active": active.reshape(grid), "artifacts": impaired.reshape(grid),
                "noise": noisy.reshape(grid), "n_active": n_active}

    def score(self, image: Any) -> float:
        return self.maps(image)["score"]

    def score_many(self, images: Iterable[Any]) -> list[float]:
        return [self.score(im) for im in images]


# --------------------------------------------------------------------------------------------
# BRISQUE (OpenCV contrib)

_DEBIAN_QUALITY_DIR = Path("/usr/share/opencv4/quality")  # Debian's opencv-data ships the same files


class BRISQUE:
    """BRISQUE (Mittal, Moorthy, Bovik, IEEE TIP 2012) through OpenCV contrib's quality module,
    with the LIVE-R2-trained SVR model that OpenCV contrib ships. Score about 0 (best) .. 100
    (worst); lower is better. Color images are given to OpenCV as BGR (it converts to gray itself).

    Needs ``cv2.quality`` (PyPI ``opencv-contrib-python-headless``). The model files come from
    ``qalign/baselines_data`` (or ``model_path``/``range_path``, or Debian's
    ``/usr/share/opencv4/quality`` from the ``opencv-data`` package when the packaged copy is absent).
    """

    name = "brisque"
    lower_is_better = True

    def __init__(self, model_path: str | os.PathLike | None = None, range_path: str | os.PathLike | None = None):
        try:
            import cv2
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("BRISQUE needs OpenCV contrib: pip install opencv-contrib-python-headless") from e
        if not hasattr(cv2, "quality"):
            raise ImportError("this OpenCV build has no cv2.quality module (it is in opencv-contrib-python[-headless], "
                              "not in opencv-python); install opencv-contrib-python-headless instead")
        self._cv2 = cv2
        model, rng = self._model_files(model_path, range_path)
        self.model_path, self.range_path = str(model), str(rng)
        self._impl = cv2.quality.QualityBRISQUE_create(self.model_path, self.range_path)

    @staticmethod
    def _model_files(model_path, range_path) -> tuple[Path, Path]:
        if model_path is not None and range_path is not None:
            return Path(model_path), Path(range_path)
        candidates = [
            (_data_file("brisque_model_live.yml.gz"), _data_file("brisque_range_live.yml")),
            (_DEBIAN_QUALITY_DIR / "brisque_model_live.yml", _DEBIAN_QUALITY_DIR / "brisque_range_live.yml"),
        ]
        for m, r in candidates:
            if m.exists() and r.exists():
                return m, r
        raise FileNotFoundError(
            "BRISQUE model files not found: qalign/baselines_data/brisque_model_live.yml.gz is missing from this "
            "install, and Debian's opencv-data (/usr/share/opencv4/quality) is not installed; pass model_path= and "
            "range_path= (OpenCV contrib's modules/quality/samples/brisque_{model,range}_live.yml)")

    def score(self, image: Any) -> float:
        arr = np.ascontiguousarray(_to_array(image))
        if arr.dtype != np.uint8:
            arr = np.clip(np.round(arr), 0, 255).astype(np.uint8)
        if arr.ndim == 3:
            arr = np.ascontiguousarray(arr[..., ::-1])  # RGB -> BGR
        return float(self._impl.compute(arr)[0])

    def score_many(self, images: Iterable[Any]) -> list[float]:
        return [self.score(im) for im in images]


BASELINES = {"brisque": BRISQUE, "niqe": NIQE, "piqe": PIQE}


def get_baseline(name: str, **kwargs):
    """An instance of a baseline by name (``brisque``, ``niqe``, ``piqe``)."""
    try:
        return BASELINES[name.lower()](**kwargs)
    except KeyError:
        raise ValueError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}") from None
