"""Vision Transformer (Dosovitskiy et al., 2021, "An Image is Worth 16x16 Words") on fastcv's kernels.

The network is torchvision's: the same modules under the same names (conv_proj, class_token,
encoder.pos_embedding, encoder.layers.encoder_layer_{i}.{ln_1, self_attention, ln_2, mlp}, encoder.ln, heads),
the same initialisation and the same builders' configurations, so torchvision's state_dicts load unchanged.

The image is cut into patch_size x patch_size patches by a strided convolution (fastcv.nn.Conv2d), a learnt
class token is put in front of the patch tokens, position embeddings are added, and pre-norm transformer blocks
(x + attention(ln_1(x)), then x + mlp(ln_2(x))) follow; the head classifies the class token's final state.

The attention is fastcv.nn.MultiheadAttention called with need_weights=False: torchvision's nn.MultiheadAttention
with the same parameters and state_dict (it is its subclass), whose forward projects q, k and v in one GEMM
and runs fastcv.ops.scaled_dot_product_attention, which never stores the [L, L] attention weights. Layer norms,
linear layers and GELU are PyTorch's (fastcv has no kernels of its own for them).

The optional convolutional stem (conv_stem_configs, Xiao et al., 2021, "Early Convolutions Help Transformers See
Better") is supported: its conv -> batch norm -> activation layers are fastcv.models.mobilenet's
Conv2dNormActivation (one conv_bn_act call each), then a 1 x 1 convolution to hidden_dim.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from functools import partial
from typing import Callable, NamedTuple

import torch
from torch import Tensor, nn

from fastcv.models._blocks import Conv2dNormActivation, reject_weights
from fastcv.nn.attention import MultiheadAttention
from fastcv.nn.batch_norm import BatchNorm2d
from fastcv.nn.conv import Conv2d

__all__ = ["ConvStemConfig", "VisionTransformer", "vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14"]


class ConvStemConfig(NamedTuple):
    """One conv -> norm -> activation layer of the convolutional stem (torchvision's ConvStemConfig, whose
    instances are accepted too; this one's norm defaults to fastcv's batch norm)."""

    out_channels: int
    kernel_size: int
    stride: int
    norm_layer: Callable[..., nn.Module] = BatchNorm2d
    activation_layer: Callable[..., nn.Module] = nn.ReLU


class MLPBlock(nn.Sequential):
    """The transformer block's feed-forward part: Linear(in_dim, mlp_dim), GELU, Dropout, Linear(mlp_dim,
    in_dim), Dropout, as modules 0-4 (torchvision.ops.MLP's layout: mlp.0 and mlp.3 hold the weights).
    Xavier-uniform weights and tiny normal biases, as torchvision's."""

    _version = 2  # torchvision's: checkpoints of version 1 name the linear layers linear_1 and linear_2

    def __init__(self, in_dim: int, mlp_dim: int, dropout: float) -> None:
        super().__init__(nn.Linear(in_dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, in_dim),
                         nn.Dropout(dropout))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.normal_(m.bias, std=1e-6)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Old checkpoints (version < 2) name the layers linear_1 / linear_2: renamed to 0 / 3, as torchvision
        does, so its older weight files load too."""
        if local_metadata.get("version", 1) < 2:
            for i in range(2):
                for kind in ("weight", "bias"):
                    old = f"{prefix}linear_{i + 1}.{kind}"
                    if old in state_dict:
                        state_dict[f"{prefix}{3 * i}.{kind}"] = state_dict.pop(old)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


class EncoderBlock(nn.Module):
    """A pre-norm transformer block: x + dropout(attention(ln_1(x))), then that + mlp(ln_2(that))."""

    def __init__(self, num_heads: int, hidden_dim: int, mlp_dim: int, dropout: float, attention_dropout: float,
                 norm_layer: Callable[..., nn.Module]) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.ln_1 = norm_layer(hidden_dim)
        # fastcv.nn.MultiheadAttention rather than calling the attention op on our own projections: it is the
        # module torchvision has here (its parameters, state_dict and init are nn.MultiheadAttention's own, hooks
        # fire), and with need_weights=False its forward is what we would write anyway (one packed q/k/v GEMM,
        # heads as views, fastcv.ops.scaled_dot_product_attention, out_proj). Its argument checks are all it
        # adds: measured on two CPU cores, 98 us a call against 82 us for those four ops written inline at
        # 2 x 5 tokens of width 192, and no difference (25.6 ms, 26.0 ms) at ViT-B/16's 8 x 197 x 768.
        self.self_attention = MultiheadAttention(hidden_dim, num_heads, dropout=attention_dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.ln_2 = norm_layer(hidden_dim)
        self.mlp = MLPBlock(hidden_dim, mlp_dim, dropout)

    def forward(self, input: Tensor) -> Tensor:
        x = self.ln_1(input)
        x, _ = self.self_attention(x, x, x, need_weights=False)
        x = self.dropout(x) + input
        return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
    """Position embeddings (one learnt vector per token, BERT's N(0, 0.02) init), dropout, the blocks as
    layers.encoder_layer_{i}, a final norm."""

    def __init__(self, seq_length: int, num_layers: int, num_heads: int, hidden_dim: int, mlp_dim: int,
                 dropout: float, attention_dropout: float, norm_layer: Callable[..., nn.Module]) -> None:
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_length, hidden_dim).normal_(std=0.02))
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.Sequential(OrderedDict(
            (f"encoder_layer_{i}", EncoderBlock(num_heads, hidden_dim, mlp_dim, dropout, attention_dropout,
                                                norm_layer))
            for i in range(num_layers)))
        self.ln = norm_layer(hidden_dim)

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() != 3 or input.shape[1:] != self.pos_embedding.shape[1:]:
            raise ValueError(f"Encoder expects tokens [N, {self.pos_embedding.shape[1]}, "
                             f"{self.pos_embedding.shape[2]}] (batch, sequence, hidden), got {list(input.shape)}")
        return self.ln(self.layers(self.dropout(input + self.pos_embedding)))


def _conv_stem(configs, hidden_dim: int) -> nn.Sequential:
    """conv_bn_relu_{i} (Conv2dNormActivation per config, from 3 input channels), then conv_last, a 1 x 1
    convolution with a bias to hidden_dim channels."""
    stem = nn.Sequential()
    channels = 3
    for i, config in enumerate(configs):
        stem.add_module(f"conv_bn_relu_{i}", Conv2dNormActivation(
            channels, config.out_channels, kernel_size=config.kernel_size, stride=config.stride,
            norm_layer=config.norm_layer, activation_layer=config.activation_layer))
        channels = config.out_channels
    stem.add_module("conv_last", Conv2d(channels, hidden_dim, kernel_size=1))
    return stem


class VisionTransformer(nn.Module):
    """The Vision Transformer with torchvision's constructor (see torchvision.models.VisionTransformer):

    image_size: the (square) input's side, a multiple of patch_size; other sizes raise ValueError.
    patch_size, num_layers, num_heads, hidden_dim, mlp_dim: the patches' side, the blocks, their heads, the token
        width and the feed-forward width.
    dropout: after the position embeddings, the attention and each linear layer; attention_dropout: on the
        attention weights.
    num_classes; representation_size: if given, a Linear + Tanh pre-logits layer of that width before the head.
    norm_layer: the blocks' norm (LayerNorm, eps 1e-6).
    conv_stem_configs: a list of ConvStemConfig for a convolutional stem instead of the patch convolution (the
        stem's total stride must then be patch_size).
    """

    def __init__(self, image_size: int, patch_size: int, num_layers: int, num_heads: int, hidden_dim: int,
                 mlp_dim: int, dropout: float = 0.0, attention_dropout: float = 0.0, num_classes: int = 1000,
                 representation_size: int | None = None,
                 norm_layer: Callable[..., nn.Module] = partial(nn.LayerNorm, eps=1e-6),
                 conv_stem_configs: list[ConvStemConfig] | None = None) -> None:
        super().__init__()
        if image_size % patch_size != 0:
            raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
        self.image_size = image_size
        self.patch_size = patch_size
        self.hidden_dim = hidden_dim
        self.mlp_dim = mlp_dim
        self.attention_dropout = attention_dropout
        self.dropout = dropout
        self.num_classes = num_classes
        self.representation_size = representation_size
        self.norm_layer = norm_layer

        if conv_stem_configs is not None:
            self.conv_proj: nn.Module = _conv_stem(conv_stem_configs, hidden_dim)
        else:
            self.conv_proj = Conv2d(3, hidden_dim, kernel_size=patch_size, stride=patch_size)
        self.class_token = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        self.seq_length = (image_size // patch_size) ** 2 + 1  # the patches and the class token
        self.encoder = Encoder(self.seq_length, num_layers, num_heads, hidden_dim, mlp_dim, dropout,
                               attention_dropout, norm_layer)
        if representation_size is None:
            heads = OrderedDict(head=nn.Linear(hidden_dim, num_classes))
        else:
            heads = OrderedDict(pre_logits=nn.Linear(hidden_dim, representation_size), act=nn.Tanh(),
                                head=nn.Linear(representation_size, num_classes))
        self.heads = nn.Sequential(heads)
        self._init_weights()

    def _init_weights(self) -> None:
        """torchvision's (after the modules' own): the patch convolution truncated-normal with variance 1/fan_in
        (the stem's last convolution normal with variance 2/out_channels), the pre-logits layer truncated-normal
        with variance 1/fan_in, zero biases, and a zero head (training starts from uniform predictions)."""
        if isinstance(self.conv_proj, nn.Conv2d):
            fan_in = self.conv_proj.in_channels * self.conv_proj.kernel_size[0] * self.conv_proj.kernel_size[1]
            nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1 / fan_in))
            nn.init.zeros_(self.conv_proj.bias)
        else:
            last = self.conv_proj.conv_last
            nn.init.normal_(last.weight, mean=0.0, std=math.sqrt(2.0 / last.out_channels))
            nn.init.zeros_(last.bias)
        if "pre_logits" in self.heads._modules:
            pre_logits = self.heads.pre_logits
            nn.init.trunc_normal_(pre_logits.weight, std=math.sqrt(1 / pre_logits.in_features))
            nn.init.zeros_(pre_logits.bias)
        nn.init.zeros_(self.heads.head.weight)
        nn.init.zeros_(self.heads.head.bias)

    def _process_input(self, x: Tensor) -> Tensor:
        """Images [N, 3, S, S] -> patch tokens [N, (S / patch_size)^2, hidden_dim], in row-major patch order."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"VisionTransformer expects images [N, 3, H, W], got {list(x.shape)}")
        h, w = x.shape[2], x.shape[3]
        if h != self.image_size or w != self.image_size:
            raise ValueError(f"VisionTransformer was built for {self.image_size} x {self.image_size} images "
                             f"(height x width), got {h} x {w}")
        return self.conv_proj(x).flatten(2).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        x = self._process_input(x)
        class_token = self.class_token.expand(x.shape[0], -1, -1)
        x = self.encoder(torch.cat([class_token, x], dim=1))
        return self.heads(x[:, 0])


def _vision_transformer(patch_size: int, num_layers: int, num_heads: int, hidden_dim: int, mlp_dim: int,
                        **kwargs) -> VisionTransformer:
    reject_weights(kwargs)
    image_size = kwargs.pop("image_size", 224)
    return VisionTransformer(image_size=image_size, patch_size=patch_size, num_layers=num_layers,
                             num_heads=num_heads, hidden_dim=hidden_dim, mlp_dim=mlp_dim, **kwargs)


def vit_b_16(**kwargs) -> VisionTransformer:
    """ViT-B/16: 16 x 16 patches, 12 layers, 12 heads, width 768, MLP 3072 (86 M parameters)."""
    return _vision_transformer(16, 12, 12, 768, 3072, **kwargs)


def vit_b_32(**kwargs) -> VisionTransformer:
    """ViT-B/32: 32 x 32 patches, 12 layers, 12 heads, width 768, MLP 3072."""
    return _vision_transformer(32, 12, 12, 768, 3072, **kwargs)


def vit_l_16(**kwargs) -> VisionTransformer:
    """ViT-L/16: 16 x 16 patches, 24 layers, 16 heads, width 1024, MLP 4096 (304 M parameters)."""
    return _vision_transformer(16, 24, 16, 1024, 4096, **kwargs)


def vit_l_32(**kwargs) -> VisionTransformer:
    """ViT-L/32: 32 x 32 patches, 24 layers, 16 heads, width 1024, MLP 4096."""
    return _vision_transformer(32, 24, 16, 1024, 4096, **kwargs)


def vit_h_14(**kwargs) -> VisionTransformer:
    """ViT-H/14: 14 x 14 patches, 32 layers, 16 heads, width 1280, MLP 5120 (632 M parameters). image_size
    defaults to 224 as in torchvision's builder (its SWAG weights are for 518: pass image_size=518)."""
    return _vision_transformer(14, 32, 16, 1280, 5120, **kwargs)
