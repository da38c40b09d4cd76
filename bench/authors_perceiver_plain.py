"""The authors' perceiver computed the plain, layer-by-layer way: the "before" of the speed work.

Same parameters (an ``AuthorsRegionPerceiver``'s), same function, written the direct way: maps
kept as NCHW-contiguous tensors and copied to and from token layout around every conv, attention
as explicit einsum -> masked_fill(-1e9) -> softmax -> einsum with the mask repeated per head,
sine positions rebuilt per image and added out of place, mask logits materialised as [B, Q, H, W],
and autograd keeping GELU's [B, H*W, 4d] output.
``bench_perceiver.py`` times it against the module's own forward (SDPA, channels-last views,
batch-shared positions added in place, token-layout heads) and checks both agree.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from medsight.model.authors_perceiver import AuthorsRegionPerceiver
from medsight.model.region_perceiver import PerceiverOutput


def _attention(attn, reader, context, blocked=None):
    q = attn.to_q(attn.reader_norm(reader))
    k, v = attn.to_kv(attn.context_norm(context)).chunk(2, dim=-1)
    heads = attn.heads
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1).permute(0, 2, 1, 3)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    logits = torch.einsum("bhid,bhjd->bhij", q, k) * attn.head_dim**-0.5
    if blocked is not None:
        logits = logits.masked_fill(blocked[:, None].repeat(1, heads, 1, 1), -1e9)
    logits = logits - logits.amax(dim=-1, keepdim=True).detach()
    out = torch.einsum("bhij,bhjd->bhid", logits.softmax(-1), v)
    return attn.to_out(out.permute(0, 2, 1, 3).reshape(reader.shape[0], reader.shape[1], -1))


def _ffn(ffn, tokens):
    return ffn.fc2(F.gelu(ffn.fc1(ffn.norm(tokens))))  # autograd keeps GELU's output too


def _block(block, reader, context, blocked=None):
    reader = block.attn_out_norm(_attention(block.attn, reader, context, blocked) + reader)
    return block.ffn_out_norm(_ffn(block.ffn, reader) + reader)


def _positions(module, batch, height, width, like):
    code = module.positions._build(height, width, like.device, like.dtype)  # [H*W, d], rebuilt every time
    return code.t().reshape(1, -1, height, width).repeat(batch, 1, 1, 1)  # [B, d, H, W] per image


def plain_forward(module: AuthorsRegionPerceiver, patch_tokens: torch.Tensor) -> PerceiverOutput:
    batch, count, dim = patch_tokens.shape
    height = width = math.isqrt(count)
    feature_map = patch_tokens.transpose(1, 2).reshape(batch, dim, height, width).contiguous()  # NCHW
    feature_map = feature_map + _positions(module, batch, height, width, feature_map)
    pixels = feature_map.flatten(2).transpose(1, 2).contiguous()
    queries = _block(module.initial, module.query_content.unsqueeze(0).expand(batch, -1, -1), pixels)

    def predict(queries, feature_map):
        masks = torch.einsum("bqd,bdhw->bqhw", module.mask_proj(queries), feature_map)
        return masks, module.class_head(queries)

    masks, classes = predict(queries, feature_map)
    aux = [(masks, classes)]
    for adapter, layer in zip(module.adapters, module.layers):
        up = F.interpolate(feature_map, scale_factor=adapter.factor, mode="bilinear", align_corners=False)
        feature_map = adapter.conv(up.contiguous())
        height, width = feature_map.shape[-2:]
        feature_map = feature_map + _positions(module, batch, height, width, feature_map)
        resized = F.interpolate(masks, size=(height, width), mode="bilinear", align_corners=False)
        blocked = (resized.sigmoid() < 0.5).flatten(2).detach()
        pixels = feature_map.flatten(2).transpose(1, 2).contiguous()
        queries = _block(layer.read_image, queries, pixels, blocked)
        pixels = _block(layer.write_image, pixels, queries)
        feature_map = pixels.transpose(1, 2).reshape(batch, dim, height, width).contiguous()
        masks, classes = predict(queries, feature_map)
        aux.append((masks, classes))
    return PerceiverOutput(queries=queries, mask_logits=masks, class_logits=classes, pixel_features=feature_map, aux=aux[:-1])
