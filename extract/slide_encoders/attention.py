"""Attention over the tiles of a whole slide, in query chunks so memory stays bounded at 50,000 tiles: a chunk's
scores are at most `budget` numbers, whatever the slide's size. Plain softmax attention, nothing approximated:
a chunk's rows are exactly the rows the whole matrix would have.

TITAN adds a bias that grows with the distance between tiles (ALiBi), built per chunk, never as an (N, N)
matrix (that is 10 GB per head at 50,000 tiles). Prov-GigaPath's LongNet mixes several attentions by their
log-sum-exp, so `attention_with_lse` returns it beside the output."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

# numbers of one chunk's score matrix: 2**25 float32 = 128 MB, a few times that in temporaries
SCORE_BUDGET = 1 << 25


def _rows_per_chunk(batch: int, keys: int, budget: int) -> int:
    return max(1, budget // max(1, batch * keys))


def biased_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     bias_rows: Callable[[int, int], torch.Tensor], budget: int = SCORE_BUDGET) -> torch.Tensor:
    """(B, H, L, d) queries, keys, values and a bias given by rows: bias_rows(s, e) is the (H, e - s, L)
    additive bias of queries s..e-1 → (B, H, L, d), softmax(q kᵀ/√d + bias) v."""
    b, h, length, _ = q.shape
    step = _rows_per_chunk(b * h, k.shape[2], budget)
    if step >= length:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias_rows(0, length).unsqueeze(0))
    out = torch.empty_like(q)
    for start in range(0, length, step):
        end = min(start + step, length)
        out[:, :, start:end] = F.scaled_dot_product_attention(q[:, :, start:end], k, v,
                                                              attn_mask=bias_rows(start, end).unsqueeze(0))
    return out


# torch's fused CPU flash attention returns the log-sum-exp too (5x the speed of the chunked matmuls on 2
# cores); it is a private op, so it is used only where it exists and answers, and checked against the chunks.
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       budget: int = SCORE_BUDGET) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, M, d) queries, keys, values → output (B, M, d) and the log-sum-exp of each query's scaled scores
    (B, M): what flash attention returns beside its output."""
    if q.device.type == "cpu" and _CPU_FLASH is not None:
        try:
            out, lse = _CPU_FLASH(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), 0.0, False)
            return out[0], lse[0].to(q.dtype)
        except (RuntimeError, TypeError):  # a torch whose op takes other arguments: the chunks below
            pass
    return chunked_attention_with_lse(q, k, v, budget)


def chunked_attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               budget: int = SCORE_BUDGET) -> tuple[torch.Tensor, torch.Tensor]:
    """attention_with_lse in chunks of queries and batches, on any device."""
    batch, m, d = q.shape
    scale = d**-0.5
    out = torch.empty_like(q)
    lse = torch.empty(batch, m, dtype=q.dtype, device=q.device)
    keys = k.shape[1]
    per_batch = max(1, budget // max(1, m * keys))  # whole batches when a batch's scores fit
    rows = m if per_batch > 1 else _rows_per_chunk(1, keys, budget)
    for b0 in range(0, batch, per_batch):
        b1 = min(b0 + per_batch, batch)
        kt = k[b0:b1].transpose(1, 2)
        for s in range(0, m, rows):
            e = min(s + rows, m)
            scores = torch.bmm(q[b0:b1, s:e], kt).mul_(scale)  # (b, rows, keys)
            chunk_lse = torch.logsumexp(scores, dim=-1)
            probs = scores.sub_(chunk_lse.unsqueeze(-1)).exp_()
            out[b0:b1, s:e] = torch.bmm(probs, v[b0:b1])
            lse[b0:b1, s:e] = chunk_lse
    return out, lse
