"""The slide-language model: cached tile embeddings → per-dimension standardisation (training-split
statistics, train/standardize.py) → projector (InternVL's mlp1) → the LLM's input embeddings at the
`<IMG_CONTEXT>` positions. Optionally a resampler first maps a slide's tiles to K learned latent tokens
(cross-attention), so long slides cost K tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from slidecache.errors import TrainingError
from train.data import IGNORE_INDEX
from train.standardize import TileStandardizer


class MLPProjector(nn.Sequential):
    """InternVL's mlp1: LayerNorm(D) → Linear(D, H) → GELU → Linear(H, H)."""

    def __init__(self, in_dim: int, llm_dim: int) -> None:
        super().__init__(nn.LayerNorm(in_dim), nn.Linear(in_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))


class Resampler(nn.Module):
    """K learned latents attend over a slide's projected tiles (Perceiver/Flamingo style) → (B, K, H)."""

    def __init__(self, dim: int, tokens: int, heads: int = 4) -> None:
        super().__init__()
        if dim % heads:
            heads = 1
        self.latents = nn.Parameter(torch.randn(tokens, dim) * dim**-0.5)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, tiles: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        queries = self.latents.unsqueeze(0).expand(tiles.shape[0], -1, -1)  # (B, K, H)
        attended, _ = self.attention(queries, tiles, tiles, key_padding_mask=~mask)
        out = queries + attended
        return out + self.mlp(self.norm(out))


class SlideVLM(nn.Module):
    """forward(input_ids, attention_mask, labels, tiles (B, T, D), tile_mask (B, T)) → the LLM's output.

    HF Trainer passes `num_items_in_batch` (the supervised tokens of the whole accumulated batch, over every
    device) and then leaves the loss as it comes: the LLM's loss must divide by that count, so the loss is
    the token-weighted mean over everything accumulated, however it is split into micro-batches or workers.
    """

    accepts_loss_kwargs = True  # Trainer: the model normalises by num_items_in_batch (it does, below)
    loss_type = "ForCausalLM"  # Trainer counts supervised tokens as a causal LM shifts them: labels[..., 1:]

    def __init__(self, llm: nn.Module, in_dim: int, llm_dim: int, img_context_id: int, resampler_tokens: int = 0,
                 standardizer: TileStandardizer | None = None) -> None:
        super().__init__()
        if standardizer is not None and standardizer.dim != in_dim:
            raise TrainingError(f"tile statistics of width {standardizer.dim} for {in_dim}-wide tiles")
        self.llm = llm
        self.standardizer = standardizer  # None: a checkpoint trained on raw tiles (before issue 26)
        self.projector = MLPProjector(in_dim, llm_dim)
        self.resampler = Resampler(llm_dim, resampler_tokens) if resampler_tokens else None
        self.img_context_id = img_context_id
        self.resampler_tokens = resampler_tokens

    @property
    def config(self):  # Trainer reads a few fields (e.g. use_cache) from the model's config
        return self.llm.config

    def base_llm(self) -> nn.Module:
        """The transformers model under the PEFT wrapper (the LLM itself without LoRA)."""
        return self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """Trainer's --gradient_checkpointing (InternVL: --grad_checkpoint) reaches the LLM's decoder layers.
        Non-reentrant checkpointing: the frozen input embeddings need no requires_grad workaround."""
        kwargs = {"use_reentrant": False} | (activation_checkpointing_kwargs or {})
        self.base_llm().activation_checkpointing_enable(kwargs, every_n_layers=every_n_layers, offload=offload)
        self.base_llm().config.use_cache = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        base = self.base_llm()
        return bool(getattr(base, "is_activation_checkpointing", getattr(base, "is_gradient_checkpointing", False)))

    def visual_tokens(self, tiles: torch.Tensor, tile_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, D) tiles → the rows to place, in order: (Σ visual tokens, H)."""
        if self.standardizer is not None:
            tiles = self.standardizer(tiles)  # (B, T, D), zero mean and unit spread over the training tiles
        projected = self.projector(tiles.to(self.projector[1].weight.dtype))  # (B, T, H)
        if self.resampler is None:
            return projected[tile_mask]
        return self.resampler(projected, tile_mask).reshape(-1, projected.shape[-1])  # (B·K, H)

    def embed(self, input_ids: torch.Tensor, tiles: torch.Tensor, tile_mask: torch.Tensor) -> torch.Tensor:
        embeddings = self.llm.get_input_embeddings()(input_ids)  # (B, L, H)
        slots = input_ids == self.img_context_id
        expected = (tile_mask.sum(1) if self.resampler is None
                    else torch.full_like(slots.sum(1), self.resampler_tokens) * (tile_mask.any(1)))
        if not torch.equal(slots.sum(1), expected):
            # Never a silently dropped image or a zeroed loss (InternVL's failure mode): stop here.
            raise TrainingError(f"visual token count mismatch: {slots.sum(1).tolist()} <IMG_CONTEXT> slots vs "
                                f"{expected.tolist()} visual tokens per sample")
        embeddings = embeddings.clone()
        embeddings[slots] = self.visual_tokens(tiles, tile_mask).to(embeddings.dtype)
        return embeddings

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, tiles: torch.Tensor,
                tile_mask: torch.Tensor, labels: torch.Tensor | None = None,
                num_items_in_batch: torch.Tensor | int | None = None):
        embeddings = self.embed(input_ids, tiles, tile_mask)
        if labels is None or not self.training:  # evaluation and inference: the LLM's own output, logits included
            loss_kwargs = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
            return self.llm(inputs_embeds=embeddings, attention_mask=attention_mask, labels=labels, use_cache=False,
                            **loss_kwargs)
        return CausalLMOutputWithPast(loss=self._supervised_loss(embeddings, attention_mask, labels, num_items_in_batch))

    def supervised_loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, tiles: torch.Tensor,
                        tile_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The mean loss over the supervised tokens of this batch (validation)."""
        return self._supervised_loss(self.embed(input_ids, tiles, tile_mask), attention_mask, labels, None)

    def _supervised_loss(self, embeddings: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                         num_items_in_batch: torch.Tensor | int | None) -> torch.Tensor:
        """The causal-LM loss of HF's ForCausalLMLoss (position p predicts label p+1; summed cross-entropy over
        the supervised tokens, divided by num_items_in_batch, else by their count), with logits computed only
        at the supervised positions: Qwen2's 151,936-entry vocabulary makes the full (B, L, V) logits and their
        gradient ~90% of a training step (measured, tiny-qwen2, B=4, L=100), and only the answers carry loss."""
        base = self.base_llm()  # LoRA sits inside its layers
        hidden = base.model(inputs_embeds=embeddings, attention_mask=attention_mask, use_cache=False).last_hidden_state
        targets = labels[:, 1:]  # (B, L-1)
        picked = targets != IGNORE_INDEX
        logits = base.lm_head(hidden[:, :-1][picked]).float()  # (N, V): only where a label is predicted
        loss = F.cross_entropy(logits, targets[picked], reduction="sum")
        return loss / (num_items_in_batch if num_items_in_batch is not None else picked.sum())

    def blank_tiles(self, n: int) -> torch.Tensor:
        """(n, D) tiles that carry no image: zeros after standardisation (the training mean), raw zeros without."""
        if self.standardizer is not None:
            return self.standardizer.blank(n).cpu()
        return torch.zeros(n, self.projector[1].in_features)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, tiles: torch.Tensor,
                 tile_mask: torch.Tensor, **kwargs: object) -> torch.Tensor:
        """New tokens only (inputs_embeds generation returns no prompt ids). Left-padded prompts."""
        embeddings = self.embed(input_ids, tiles, tile_mask)
        return self.llm.generate(inputs_embeds=embeddings, attention_mask=attention_mask, **kwargs)


def check_trainable(model: SlideVLM) -> None:
    if not any(p.requires_grad for p in model.parameters()):
        raise TrainingError("no parameter is trainable")
