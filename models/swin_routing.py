"""Make every conv/linear computation of torchvision's Swin-V2 attention a module call with one batch.

torchvision's ``ShiftedWindowAttentionV2`` applies its ``qkv`` and ``proj`` weights with
``F.linear(x, module.weight, ...)``, so forward hooks (ours, PyTorchFI's) never see those layers, and it
computes the relative-position bias (``cpb_mlp``) once from a constant table, so that layer's output has
no image dimension. :func:`route_window_attention` swaps each such block's ``forward`` for one that

* calls ``qkv`` and ``proj`` as modules on ``[B, windows, tokens, C]`` (the image batch first, so that an
  output element of one image is one fault site); ``qkv`` becomes a :class:`KeyMaskedLinear`, which zeroes
  the key part of its bias in the forward pass exactly as torchvision does;
* computes the bias table once per image in evaluation mode (the constant table repeated over the batch):
  a transient flip in ``cpb_mlp`` during one inference then corrupts that inference's bias table only.
  Training computes it once per batch, as torchvision does.

Parameters, buffers and state-dict keys are unchanged, and the fault-free outputs are bit-identical to
torchvision's on the same kernels (each row of a GEMM sums in the same order whatever the row count).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.swin_transformer import ShiftedWindowAttentionV2


class KeyMaskedLinear(nn.Linear):
    """The Swin-V2 ``qkv`` projection: a Linear whose bias is used with its key third set to zero."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``F.linear`` with the key part of the bias zeroed (on a copy: the parameter is untouched)."""
        bias = self.bias
        if bias is not None:
            bias = bias.clone()
            third = bias.numel() // 3
            bias[third : 2 * third].zero_()
        return F.linear(x, self.weight, bias)


def _geometry(x: torch.Tensor, window: list[int], shift: list[int]) -> tuple[int, int, list[int]]:
    """Padded height and width of ``x`` ([B, H, W, C]) and the shift torchvision applies (none along a
    side that one window covers)."""
    height, width = x.shape[1], x.shape[2]
    pad_h = height + (window[0] - height % window[0]) % window[0]
    pad_w = width + (window[1] - width % window[1]) % window[1]
    shift = [0 if window[0] >= pad_h else shift[0], 0 if window[1] >= pad_w else shift[1]]
    return pad_h, pad_w, shift


def _partition(x: torch.Tensor, window: list[int], shift: list[int]) -> torch.Tensor:
    """Pad, shift cyclically and cut ``x`` into windows: ``[B, windows, tokens, C]``."""
    batch, height, width, channels = x.shape
    pad_h, pad_w, shift = _geometry(x, window, shift)
    x = F.pad(x, (0, 0, 0, pad_w - width, 0, pad_h - height))
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    rows, cols = pad_h // window[0], pad_w // window[1]
    x = x.view(batch, rows, window[0], cols, window[1], channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(batch, rows * cols, window[0] * window[1], channels)


def _per_image(table: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The constant coordinate table ``[1, ...]`` repeated once per image of ``x``."""
    return table.expand(x.shape[0], *table.shape[1:])


def _position_bias(values: torch.Tensor, index: torch.Tensor, window: list[int]) -> torch.Tensor:
    """cpb_mlp's output ``[B, 2Wh-1, 2Ww-1, heads]`` gathered into ``16 sigmoid(bias)``, ``[B, heads, tokens, tokens]``."""
    batch, tokens = values.shape[0], window[0] * window[1]
    gathered = values.reshape(batch, -1, values.shape[-1])[:, index]
    return 16 * torch.sigmoid(gathered.view(batch, tokens, tokens, -1).permute(0, 3, 1, 2))


def _attention_mask(like: torch.Tensor, size: tuple[int, int], window: list[int], shift: list[int]) -> torch.Tensor:
    """torchvision's mask of the shifted windows (dtype and device of ``like``): 0 within a region, -100 across."""
    mask = like.new_zeros(size)
    h_slices = ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None))
    w_slices = ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None))
    count = 0
    for h in h_slices:
        for w in w_slices:
            mask[h[0] : h[1], w[0] : w[1]] = count
            count += 1
    mask = mask.view(size[0] // window[0], window[0], size[1] // window[1], window[1])
    mask = mask.permute(0, 2, 1, 3).reshape(-1, window[0] * window[1])
    mask = mask.unsqueeze(1) - mask.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


def _attend(
    qkv: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, logit_scale: torch.Tensor, window: list[int],
    shift: list[int], heads: int, dropout: float, training: bool,
) -> torch.Tensor:
    """Cosine attention of the windows (``qkv``: ``[B, windows, tokens, 3C]``) with the per-image position
    bias and the shift mask; ``[B, windows, tokens, C]``, ready for ``proj``."""
    batch, num_windows, tokens, channels = qkv.shape[0], qkv.shape[1], qkv.shape[2], qkv.shape[3] // 3
    pad_h, pad_w, shift = _geometry(x, window, shift)
    qkv = qkv.reshape(batch * num_windows, tokens, 3, heads, channels // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
    attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    attn = attn.view(batch, num_windows, heads, tokens, tokens) + bias.unsqueeze(1)
    if sum(shift) > 0:
        attn = attn + _attention_mask(qkv, (pad_h, pad_w), window, shift).unsqueeze(1).unsqueeze(0)
    attn = F.softmax(attn.view(-1, heads, tokens, tokens), dim=-1)
    attn = F.dropout(attn, p=dropout, training=training)
    return attn.matmul(v).transpose(1, 2).reshape(batch, num_windows, tokens, channels)


def _reverse(y: torch.Tensor, x: torch.Tensor, window: list[int], shift: list[int]) -> torch.Tensor:
    """Windows ``[B, windows, tokens, C]`` back to the layout of ``x`` ([B, H, W, C]): undo shift and padding."""
    batch, height, width, channels = x.shape
    pad_h, pad_w, shift = _geometry(x, window, shift)
    y = y.view(batch, pad_h // window[0], pad_w // window[1], window[0], window[1], channels)
    y = y.permute(0, 1, 3, 2, 4, 5).reshape(batch, pad_h, pad_w, channels)
    if sum(shift) > 0:
        y = torch.roll(y, shifts=(shift[0], shift[1]), dims=(1, 2))
    return y[:, :height, :width, :].contiguous()


# Shape-dependent steps stay single calls in torch.fx traces (the fast engine's), as torchvision's own are.
for _name in ("_partition", "_per_image", "_position_bias", "_attend", "_reverse"):
    torch.fx.wrap(_name)


class RoutedWindowAttentionV2(ShiftedWindowAttentionV2):
    """A ``ShiftedWindowAttentionV2`` whose conv/linear computations are module calls (module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """torchvision's ``shifted_window_attention`` (Swin-V2 branch), the same operations in the same
        order, with qkv, proj and cpb_mlp called as modules on outputs that lead with the image batch."""
        window, shift = self.window_size, self.shift_size
        qkv = self.qkv(_partition(x, window, shift))
        # Per-image copies are for fault injection (evaluation); training computes the same table once,
        # which saves the copies' activation memory.
        table = self.relative_coords_table if self.training else _per_image(self.relative_coords_table, x)
        bias = _position_bias(self.cpb_mlp(table), self.relative_position_index, window)
        y = _attend(qkv, bias, x, self.logit_scale, window, shift, self.num_heads, self.attention_dropout, self.training)
        y = F.dropout(self.proj(y), p=self.dropout, training=self.training)
        return _reverse(y, x, window, shift)


def route_window_attention(model: nn.Module) -> int:
    """Route every Swin-V2 window attention of ``model`` through its modules, in place (the same parameters,
    so optimisers and state dicts are unaffected); returns how many were routed."""
    routed = 0
    for module in model.modules():
        if type(module) is ShiftedWindowAttentionV2:
            module.__class__ = RoutedWindowAttentionV2
            if type(module.qkv) is nn.Linear:
                module.qkv.__class__ = KeyMaskedLinear
            routed += 1
    return routed
