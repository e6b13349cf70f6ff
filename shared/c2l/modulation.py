"""Gene-conditioned local modulation of a frozen central model: a gene encoder drives zero-initialised FiLM.

The encoder reads the panel's normalised expression together with the measured mask (an unmeasured gene is
zero AND flagged, so "not measured" differs from "not expressed"); its embedding yields a per-channel
(scale, shift) for every ResNet block of the UNet, applied to the block output as (1 + scale) * h + shift.
The FiLM layers start at zero, so before adaptation the conditioned model equals the central model exactly.
The all-missing condition (mask = 0) is the null condition used by condition dropout and classifier-free
guidance.

Optionally (`attention_film`) the gene embedding also drives an adaptive GroupNorm in every attention block
(adaLN-style, as DiT and gene-conditioned histology generators condition every block): a zero-initialised
(scale, shift) on the attention's normalised input, so the genes steer what attention mixes, not only the
ResNet outputs. Same zero-init contract, and plain nn.Linear layers for Opacus.

Optionally (`lora_rank > 0`) low-rank adapters on the attention projections (to_q, to_k, to_v, to_out) add a
site-specific, gene-independent correction W x + B A x; B starts at zero, so the zero-init contract holds.
Hand-written (two bias-free nn.Linear per projection, applied by forward hooks like FiLM) rather than peft:
peft is not installed here, and plain nn.Linear layers are what Opacus computes per-sample gradients for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from shared.c2l import checkpoint
from shared.c2l.central import CentralDiffusion
from shared.errors import FedstError
from shared.persistence import Pretrained, write_artifact

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def film_channels(central: CentralDiffusion) -> list[int]:
    """Output channels of every ResNet block of the central UNet, in module order (the FiLM sites)."""
    return [int(m.out_channels) for _, m in _resnet_blocks(central)]


def _resnet_blocks(central: CentralDiffusion) -> list[tuple[str, nn.Module]]:
    from diffusers.models.resnet import ResnetBlock2D

    return [(n, m) for n, m in central.unet.named_modules() if isinstance(m, ResnetBlock2D)]


def attention_norm_channels(central: CentralDiffusion) -> list[int]:
    """Channels of every attention block's input GroupNorm, in module order (the adaptive-norm sites)."""
    return [int(m.num_channels) for _, m in _attention_norms(central)]


def _attention_norms(central: CentralDiffusion) -> list[tuple[str, nn.GroupNorm]]:
    from diffusers.models.attention_processor import Attention

    return [
        (f"{n}.group_norm", m.group_norm)
        for n, m in central.unet.named_modules()
        if isinstance(m, Attention) and isinstance(m.group_norm, nn.GroupNorm)
    ]


LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def _attention_projections(central: CentralDiffusion) -> list[tuple[str, nn.Linear]]:
    from diffusers.models.attention_processor import Attention

    out = []
    for name, module in central.unet.named_modules():
        if isinstance(module, Attention):
            for target in LORA_TARGETS:
                layer = module.get_submodule(target)
                if isinstance(layer, nn.Linear):
                    out.append((f"{name}.{target}", layer))
    return out


def lora_layers(central: CentralDiffusion) -> list[list]:
    """[name, in_features, out_features] of every attention projection of the central UNet (the LoRA sites)."""
    return [[name, int(m.in_features), int(m.out_features)] for name, m in _attention_projections(central)]


class LoRA(nn.Module):
    """Low-rank update (alpha / rank) * B A x with B zero-initialised (the update starts at exactly zero)."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)
        nn.init.zeros_(self.up.weight)
        self.scale = float(alpha) / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x)) * self.scale


class GeneModulation(nn.Module, Pretrained):
    """Gene encoder MLP + one zero-initialised FiLM projection per ResNet block (the only trained weights).

    Saved as adapter_config.json + adapter.safetensors by `save_adapter`, which adds the central hash and
    provenance to the config (keys that are not constructor arguments are the adapter's metadata).
    """

    kind = "c2l-adapter"
    config_name = ADAPTER_CONFIG
    weights_name = ADAPTER_WEIGHTS
    optional_config_keys = ("lora_rank", "lora_layers", "lora_alpha", "attention_channels")  # absent when unused

    def __init__(
        self,
        panel: Sequence[str],
        channels: Sequence[int],
        hidden_dim: int = 64,
        embed_dim: int = 32,
        lora_rank: int = 0,
        lora_layers: Sequence[Sequence] | None = None,
        lora_alpha: float | None = None,
        attention_channels: Sequence[int] | None = None,
    ):
        super().__init__()
        if lora_rank < 0 or (lora_rank > 0 and not lora_layers):
            raise FedstError(
                f"gene modulation: lora_rank {lora_rank} needs >= 0 and, when > 0, the attention "
                "projections to adapt (lora_layers)"
            )
        self.config: dict[str, Any] = dict(
            panel=[str(g) for g in panel],
            channels=[int(c) for c in channels],
            hidden_dim=int(hidden_dim),
            embed_dim=int(embed_dim),
        )
        if lora_rank > 0:  # only then, so adapters without LoRA keep their config (and hashes) unchanged
            self.config.update(
                lora_rank=int(lora_rank),
                lora_alpha=float(lora_alpha or lora_rank),
                lora_layers=[[str(n), int(i), int(o)] for n, i, o in lora_layers],
            )
        if attention_channels:  # likewise only when used
            self.config["attention_channels"] = [int(c) for c in attention_channels]
        n_genes = len(self.config["panel"])
        if n_genes == 0:
            raise FedstError("gene modulation: empty gene panel")
        self.encoder = nn.Sequential(
            nn.Linear(2 * n_genes, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, embed_dim), nn.SiLU()
        )
        sites = self.config["channels"] + self.config.get("attention_channels", [])
        self.film = nn.ModuleList(nn.Linear(embed_dim, 2 * c) for c in sites)
        for layer in self.film:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.lora = nn.ModuleList(
            LoRA(i, o, self.lora_rank, self.config["lora_alpha"]) for _, i, o in self.config.get("lora_layers", [])
        )

    @property
    def lora_rank(self) -> int:
        return self.config.get("lora_rank", 0)

    @property
    def panel(self) -> list[str]:
        return self.config["panel"]

    @property
    def attention_film(self) -> bool:
        return bool(self.config.get("attention_channels"))

    def forward(self, expression: torch.Tensor, mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-site (scale, shift), each (B, C): the ResNet blocks, then the attention norms (if any)."""
        mask = mask.to(expression.dtype)
        embedding = self.encoder(torch.cat([expression * mask, mask], dim=1))
        out = []
        for layer in self.film:
            scale, shift = layer(embedding).chunk(2, dim=1)
            out.append((scale, shift))
        return out


class ConditionedDiffusion(nn.Module):
    """Frozen central model + trainable GeneModulation. `forward(x, t, expression, mask)` is pure.

    Hooks on the central's ResNet blocks apply the FiLM parameters computed for the current call only; with
    no call in progress they are the identity, so the central model used on its own is unaffected.
    """

    def __init__(self, central: CentralDiffusion, modulation: GeneModulation):
        super().__init__()
        if modulation.config["channels"] != film_channels(central):
            raise FedstError("adapter does not fit the central model: its FiLM channels differ from the UNet's blocks")
        if modulation.lora_rank and modulation.config["lora_layers"] != lora_layers(central):
            raise FedstError("adapter does not fit the central model: its LoRA layers differ from the UNet's attention")
        if modulation.attention_film and modulation.config["attention_channels"] != attention_norm_channels(central):
            raise FedstError("adapter does not fit the central model: its attention norms differ from the UNet's")
        self.central = central
        self.modulation = modulation
        self._film: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.info: dict[str, Any] = {}  # provenance carried along (epsilon, store, training summary)
        film_sites = _resnet_blocks(central) + (_attention_norms(central) if modulation.attention_film else [])
        self._handles = [module.register_forward_hook(self._make_hook(i)) for i, (_, module) in enumerate(film_sites)]
        if modulation.lora_rank:
            self._handles += [
                module.register_forward_hook(self._make_lora_hook(i))
                for i, (_, module) in enumerate(_attention_projections(central))
            ]
        self.freeze_central()

    def _make_hook(self, index: int):
        def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
            if self._film is None:
                return None
            scale, shift = self._film[index]
            trailing = (1,) * (output.dim() - 2)  # (B, C, H, W) after a ResNet block, (B, C, H*W) in attention
            return output * (1 + scale.view(*scale.shape, *trailing)) + shift.view(*shift.shape, *trailing)

        return hook

    def _make_lora_hook(self, index: int):
        def hook(_module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
            if self._film is None:
                return None
            return output + self.modulation.lora[index](inputs[0])

        return hook

    def freeze_central(self) -> None:
        self.central.requires_grad_(False)
        self.central.eval()

    def train(self, mode: bool = True) -> ConditionedDiffusion:
        super().train(mode)
        self.central.eval()  # frozen parts stay in eval mode whatever the wrapper's mode
        return self

    def forward(self, x: torch.Tensor, t: torch.Tensor, expression: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self._film = self.modulation(expression, mask)
        try:
            return self.central(x, t)
        finally:
            self._film = None

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def panel(self) -> list[str]:
        return self.modulation.panel

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def trainable_fraction(self) -> float:
        return self.trainable_parameters() / self.central.num_parameters()


def create_conditioned(
    central: CentralDiffusion,
    panel: Sequence[str],
    hidden_dim: int = 64,
    embed_dim: int = 32,
    lora_rank: int = 0,
    lora_alpha: float | None = None,
    attention_film: bool = False,
) -> ConditionedDiffusion:
    """Zero-initialised modulation for `central`; `lora_rank > 0` adds LoRA on every attention projection,
    `attention_film` the gene-driven adaptive norm in every attention block."""
    if lora_rank and not lora_layers(central):
        raise FedstError("lora_rank > 0 but the central UNet has no attention blocks to adapt")
    if attention_film and not attention_norm_channels(central):
        raise FedstError("attention_film but the central UNet has no attention blocks to modulate")
    modulation = GeneModulation(
        panel,
        film_channels(central),
        hidden_dim,
        embed_dim,
        lora_rank=lora_rank,
        lora_layers=lora_layers(central) if lora_rank else None,
        lora_alpha=lora_alpha,
        attention_channels=attention_norm_channels(central) if attention_film else None,
    )
    return ConditionedDiffusion(central, modulation)


def save_adapter(model: ConditionedDiffusion, directory: str | Path, **metadata: Any) -> Path:
    """Only the modulation weights + config + the hash of the central weights they belong to + metadata."""
    info = {k: v for k, v in model.info.items() if k != "adapter_hash"}
    extra = {**info, **metadata, "central_hash": model.central.weights_hash()}
    return write_artifact(directory, model.modulation.artifact_files(extra))


def load_adapter_config(directory: str | Path) -> dict[str, Any]:
    return GeneModulation.read_pretrained_config(directory)[1]


def load_adapter(central: CentralDiffusion, directory: str | Path) -> ConditionedDiffusion:
    """Attach a saved adapter to `central`; FedstError when it was trained on different central weights."""
    path, config = GeneModulation.read_pretrained_config(directory)
    central_hash = central.weights_hash()
    if config.get("central_hash") != central_hash:
        raise FedstError(
            f"{path}: adapter belongs to "
            f"central weights {str(config.get('central_hash'))[:12]}, "
            f"not to the given central model {central_hash[:12]}"
        )
    modulation, _ = GeneModulation.from_config(path, config)
    modulation.load_pretrained_weights(directory)
    model = ConditionedDiffusion(central, modulation)
    # provenance: every key but the modulation's own config (adapt's info repeats e.g. lora_rank: 0 there)
    model.info = {k: v for k, v in config.items() if k not in modulation.config and k != "kind"}
    model.info["adapter_hash"] = checkpoint.weights_hash(modulation.state_dict())
    return model.eval()
