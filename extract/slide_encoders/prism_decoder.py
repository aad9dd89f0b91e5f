"""PRISM's report decoder (Shaikovski et al. 2024, paige-ai/Prism): BioGPT (24 layers, 1024-d) whose upper half
(layers 12-23) also cross-attends, CoCa-style, to the 512 image latents of PRISM's Perceiver (prism.py); with the
Perceiver it turns a slide's Virchow (v1) tile embeddings into a report, a baseline beside our own reporter
(`python -m evaluate prism-report`, evaluate/prism_report.py).

Our own code, learnt from the hub repository's model code as copied into the public repository
DIAGNijmegen/unicorn_baseline at commit dec380918e3b, src/unicorn_baseline/vision_language/prism/ (biogpt.py,
biogpt_hf.py, modeling_prism.py, config.json): parameter names and shapes are that code's `text_decoder` state
dict, so the published model.safetensors loads strictly; transformers' BioGPT supplies the config, the token and
position embeddings and the tokenizer. What PRISM adds to BioGPT: `x_attn` + `x_attn_layer_norm` in layers
num_hidden_layers // 2 and up (pre-norm, after self-attention, no mask: every latent is seen; keys and values
from the 1280-d latents), the output projection tied to the token embedding (the file keeps embed_tokens).

Generation as Prism.generate runs it with the model card's settings: the prompt is BioGPT's BOS, which is its
EOS `</s>` (id 2); beam search (num_beams 5, do_sample False, length_penalty 1, early_stopping False) as
transformers scores beams: a finished beam's score is its summed log-probability over the number of tokens it
generated (its EOS counted), and a slide is done when num_beams beams have finished and none running could
still beat the worst of them. fp16 autocast on CUDA, as PRISM runs; fp32 on the CPU."""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BioGptConfig
from transformers.models.biogpt.modeling_biogpt import BioGptLearnedPositionalEmbedding, BioGptScaledWordEmbedding

from extract.encoder_weights import hub_download, is_hub_id, read_state_dict, resolve_weights_file, sha256_file
from extract.slide_encoders.prism import PRISM_ARCH, PrismResampler
from slidecache.errors import EncoderError

# paige-ai/Prism config.json: biogpt_config (the fields the model reads) and biogpt_context_dim
PRISM_DECODER_CONFIG: dict[str, Any] = dict(vocab_size=42384, hidden_size=1024, num_hidden_layers=24,
                                            num_attention_heads=16, intermediate_size=4096, hidden_act="gelu",
                                            max_position_embeddings=1024, scale_embedding=True, pad_token_id=1,
                                            bos_token_id=0, eos_token_id=2)
PRISM_CONTEXT_DIM = 1280
PRISM_HUB_ID = "paige-ai/Prism"
RANDOM_WEIGHTS = "prism-random"  # --weights: the full architecture, random init (no file)
# the tokenizer Prism's code loads: microsoft/biogpt at this commit (vocab.json + merges.txt)
BIOGPT_TOKENIZER = ("microsoft/biogpt", "eb0d815e95434dc9e3b78f464e52b899bee7d923")
TOKENIZER_FILES = ("vocab.json", "merges.txt")
# parts of the published file neither the resampler nor the decoder is: the contrastive head
CONTRASTIVE_PREFIXES = ("img_to_latents.", "text_to_latents.", "temperature")


class _Attention(nn.Module):
    """BioGPT's multi-head attention with biases; `kv_dim` other than the width: cross-attention to the latents.
    q_proj, k_proj, v_proj, out_proj are the published names."""

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(kv_dim or dim, dim)
        self.v_proj = nn.Linear(kv_dim or dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.heads, -1).transpose(1, 2)

    def keys_values(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._split(self.k_proj(source)), self._split(self.v_proj(source))

    def attend(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
        b, t, dim = x.shape
        queries = self._split(self.q_proj(x))  # fp16 under autocast, as the cached keys may be
        out = F.scaled_dot_product_attention(queries, keys.to(queries.dtype), values.to(queries.dtype), attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, dim))


class _DecoderLayer(nn.Module):
    """Pre-norm self-attention, then (PRISM's upper layers) pre-norm cross-attention to the latents, then the
    GELU MLP, each added back."""

    def __init__(self, config: BioGptConfig, context_dim: int | None) -> None:
        super().__init__()
        dim = config.hidden_size
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.self_attn = _Attention(dim, config.num_attention_heads)
        if context_dim is not None:
            self.x_attn_layer_norm = nn.LayerNorm(dim)
            self.x_attn = _Attention(dim, config.num_attention_heads, kv_dim=context_dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, dim)
        self.cross_attends = context_dim is not None

    def forward(self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None, causal: torch.Tensor | None,
                context: tuple[torch.Tensor, torch.Tensor] | None, context_mask: torch.Tensor | None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        normed = self.self_attn_layer_norm(x)
        keys, values = self.self_attn.keys_values(normed)
        if past is not None:  # the cache: this layer's keys and values of the tokens before
            keys, values = torch.cat([past[0], keys], dim=2), torch.cat([past[1], values], dim=2)
        x = x + self.self_attn.attend(normed, keys, values, causal)
        if self.cross_attends:
            assert context is not None
            x = x + self.x_attn.attend(self.x_attn_layer_norm(x), context[0], context[1], context_mask)
        x = x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))
        return x, (keys, values)


class _BioGpt(nn.Module):
    """`text_decoder.model.biogpt`: scaled token embeddings, learned positions (offset 2, transformers' own
    classes), the layers, the final norm."""

    def __init__(self, config: BioGptConfig, context_dim: int) -> None:
        super().__init__()
        dim = config.hidden_size
        scale = math.sqrt(dim) if config.scale_embedding else 1.0
        self.embed_tokens = BioGptScaledWordEmbedding(config.vocab_size, dim, config.pad_token_id, embed_scale=scale)
        self.embed_positions = BioGptLearnedPositionalEmbedding(config.max_position_embeddings, dim)
        first_cross = config.num_hidden_layers // 2  # PRISM: the upper half reads the image
        self.layers = nn.ModuleList(_DecoderLayer(config, context_dim if i >= first_cross else None)
                                    for i in range(config.num_hidden_layers))
        self.layer_norm = nn.LayerNorm(dim)


class _CausalLM(nn.Module):
    """`text_decoder.model`: BioGPT and its output projection, tied to the token embedding as published."""

    def __init__(self, config: BioGptConfig, context_dim: int) -> None:
        super().__init__()
        self.biogpt = _BioGpt(config, context_dim)
        self.output_projection = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie()

    def tie(self) -> None:
        """One tensor under both names (again after load_state_dict(assign=True), which gives each name its own)."""
        self.output_projection.weight = self.biogpt.embed_tokens.weight


@dataclass
class DecodeState:
    """What decoding one batch of sequences keeps between steps: each layer's self-attention keys and values
    (the cache) and the cross-attending layers' keys and values of the latents (computed once)."""

    context: dict[int, tuple[torch.Tensor, torch.Tensor]]
    context_mask: torch.Tensor | None  # (B, 1, 1, M): True for a latent to read
    past: list[tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=list)
    length: int = 0

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep the cache rows of `rows` (beam search: the beams that go on)."""
        self.past = [None if p is None else (p[0].index_select(0, rows), p[1].index_select(0, rows))
                     for p in self.past]


class PrismTextDecoder(nn.Module):
    """`text_decoder` of paige-ai/Prism: token ids and image latents (B, M, context_dim) → next-token logits."""

    def __init__(self, config: BioGptConfig, context_dim: int = PRISM_CONTEXT_DIM) -> None:
        super().__init__()
        self.config = config
        self.context_dim = context_dim
        self.model = _CausalLM(config, context_dim)

    def start(self, latents: torch.Tensor, context_mask: torch.Tensor | None = None, rows: int | None = None
              ) -> DecodeState:
        """The state for decoding over `latents` (B, M, C); `rows` > B repeats one slide's latents for its beams
        (B = 1) without copying them. `context_mask` (B, M): True for a latent, False for padding."""
        layers = self.model.biogpt.layers
        context = {}
        for i, layer in enumerate(layers):
            if layer.cross_attends:
                keys, values = layer.x_attn.keys_values(latents)
                context[i] = (keys.expand(rows or keys.shape[0], -1, -1, -1),
                              values.expand(rows or values.shape[0], -1, -1, -1))
        mask = None if context_mask is None else context_mask.bool()[:, None, None, :].expand(
            rows or context_mask.shape[0], -1, -1, -1)
        return DecodeState(context, mask, [None] * len(layers))

    def step(self, input_ids: torch.Tensor, state: DecodeState) -> torch.Tensor:
        """The tokens (B, T) that follow the state's → logits (B, T, vocab); the state takes them in."""
        body = self.model.biogpt
        t = input_ids.shape[1]
        positions = torch.arange(state.length, state.length + t, device=input_ids.device).expand(input_ids.shape[0], -1)
        x = body.embed_tokens(input_ids) + body.embed_positions(None, position_ids=positions)
        causal = None
        if t > 1:  # a query sees the cached tokens and those up to itself
            causal = torch.ones(t, state.length + t, dtype=torch.bool, device=x.device).tril(state.length)
        for i, layer in enumerate(body.layers):
            x, state.past[i] = layer(x, state.past[i], causal, state.context.get(i), state.context_mask)
        state.length += t
        return self.model.output_projection(body.layer_norm(x))

    def forward(self, input_ids: torch.Tensor, latents: torch.Tensor,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher forcing without a cache: (B, T) ids over (B, M, C) latents → logits (B, T, vocab)."""
        return self.step(input_ids, self.start(latents, context_mask))


class PrismReportModel(nn.Module):
    """The two parts of paige-ai/Prism a report needs, under their published names: `image_resampler` (tiles →
    latents) and `text_decoder` (latents → text). The contrastive head is left out."""

    def __init__(self, resampler_arch: Mapping[str, Any] = PRISM_ARCH,
                 decoder_config: Mapping[str, Any] = PRISM_DECODER_CONFIG,
                 context_dim: int = PRISM_CONTEXT_DIM) -> None:
        super().__init__()
        if int(resampler_arch["latent_dim"]) != context_dim:
            raise EncoderError(f"the decoder reads {context_dim}-d latents but the resampler makes "
                               f"{resampler_arch['latent_dim']}-d ones (biogpt_context_dim vs perceiver latent_dim)")
        self.image_resampler = PrismResampler(**resampler_arch)
        self.text_decoder = PrismTextDecoder(BioGptConfig(**decoder_config), context_dim)


def beam_search(decoder: PrismTextDecoder, latents: torch.Tensor, prompt: list[int], eos_token_id: int,
                num_beams: int = 5, max_new_tokens: int = 128, length_penalty: float = 1.0,
                context_mask: torch.Tensor | None = None) -> list[int]:
    """One slide's latents (1, M, C) → the token ids generated after `prompt`, without the EOS. Greedy when
    num_beams is 1; else transformers' beam search (see the module docstring)."""
    if num_beams < 1 or max_new_tokens < 1:
        raise EncoderError(f"num_beams and max_new_tokens must be at least 1 (got {num_beams}, {max_new_tokens})")
    device = latents.device
    state = decoder.start(latents, context_mask, rows=num_beams)
    ids = torch.tensor([prompt] * num_beams, device=device)
    logits = decoder.step(ids, state)[:, -1]
    generated = torch.empty(num_beams, 0, dtype=torch.long, device=device)
    if num_beams == 1:
        for _ in range(max_new_tokens):
            token = logits.float().argmax(-1)
            if int(token) == eos_token_id:
                break
            generated = torch.cat([generated, token[:, None]], dim=1)
            logits = decoder.step(token[:, None], state)[:, -1]
        return generated[0].tolist()
    scores = torch.full((num_beams,), -1e9, device=device)
    scores[0] = 0.0  # all beams start as the prompt: only the first is expanded at the first step
    finished = _Finished(num_beams, length_penalty)
    for step in range(1, max_new_tokens + 1):
        vocab = logits.shape[-1]
        candidates = (logits.float().log_softmax(-1) + scores[:, None]).view(-1)
        top, flat = candidates.topk(2 * num_beams)  # enough that num_beams go on after EOS ones end
        rows, tokens, next_scores = [], [], []
        for rank, (score, index) in enumerate(zip(top.tolist(), flat.tolist())):
            beam, token = divmod(index, vocab)
            if token == eos_token_id:
                if rank < num_beams:  # an EOS below the top num_beams ends nothing
                    finished.add(generated[beam].tolist(), score, step)
            else:
                rows.append(beam)
                tokens.append(token)
                next_scores.append(score)
            if len(rows) == num_beams:
                break
        if finished.done(top[0].item(), step):
            break
        order = torch.tensor(rows, device=device)
        generated = torch.cat([generated.index_select(0, order), torch.tensor(tokens, device=device)[:, None]], 1)
        scores = torch.tensor(next_scores, device=device)
        if step == max_new_tokens:
            break
        state.reorder(order)
        logits = decoder.step(generated[:, -1:], state)[:, -1]
    for beam in range(num_beams):  # the beams still running at the end compete with the finished ones
        finished.add(generated[beam].tolist(), float(scores[beam]), generated.shape[1])
    return finished.best()


class _Finished:
    """The num_beams best finished hypotheses, scored by summed log-probability / generated length ** penalty."""

    def __init__(self, num_beams: int, length_penalty: float) -> None:
        self.num_beams, self.length_penalty = num_beams, length_penalty
        self.beams: list[tuple[float, list[int]]] = []

    def add(self, tokens: list[int], summed: float, length: int) -> None:
        score = summed / max(length, 1) ** self.length_penalty
        if len(self.beams) < self.num_beams or score > self.worst:
            self.beams.append((score, tokens))
            if len(self.beams) > self.num_beams:
                self.beams.remove(min(self.beams, key=lambda b: b[0]))

    @property
    def worst(self) -> float:
        return min(b[0] for b in self.beams) if self.beams else -math.inf

    def done(self, best_running: float, length: int) -> bool:
        """No running beam can still beat the worst finished one (transformers' early_stopping=False)."""
        return len(self.beams) >= self.num_beams and self.worst >= best_running / length ** self.length_penalty

    def best(self) -> list[int]:
        return max(self.beams, key=lambda b: b[0])[1]


def read_architecture(config_file: Path | None) -> tuple[dict[str, Any], dict[str, Any], int]:
    """(resampler arch, decoder config, context dim) from a config.json in the hub's format (perceiver_config,
    biogpt_config, biogpt_context_dim), or PRISM's published ones without a file."""
    if config_file is None or not config_file.is_file():
        return dict(PRISM_ARCH), dict(PRISM_DECODER_CONFIG), PRISM_CONTEXT_DIM
    try:
        raw = json.loads(config_file.read_text())
        resampler = {k: int(raw["perceiver_config"][k]) for k in PRISM_ARCH}
        decoder = {k: type(v)(raw["biogpt_config"][k]) for k, v in PRISM_DECODER_CONFIG.items()}
        context = int(raw.get("biogpt_context_dim", PRISM_CONTEXT_DIM))
    except (ValueError, KeyError, TypeError) as e:
        raise EncoderError(f"{config_file}: not a PRISM config.json (perceiver_config with {', '.join(PRISM_ARCH)}; "
                           f"biogpt_config with {', '.join(PRISM_DECODER_CONFIG)}): {type(e).__name__}: {e}") from e
    return resampler, decoder, context


def load_biogpt_tokenizer(source: str | None, beside: Path | None = None) -> tuple[Any, str]:
    """BioGPT's tokenizer and where it came from: `source` a folder with vocab.json and merges.txt or a hub id;
    None: the folder of the weights file `beside` (or its biogpt/ subfolder) when it holds them, else what
    Prism's code loads (microsoft/biogpt at its pinned commit)."""
    from transformers import BioGptTokenizer  # needs sacremoses

    folders = [] if source is not None or beside is None else [beside.parent, beside.parent / "biogpt"]
    if source is not None and Path(source).expanduser().is_dir():
        folders = [Path(source).expanduser()]
    for folder in folders:
        if all((folder / name).is_file() for name in TOKENIZER_FILES):
            return BioGptTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")), str(folder)
    if source is not None and not is_hub_id(source):
        raise EncoderError(f"tokenizer {source!r}: not a folder holding {' and '.join(TOKENIZER_FILES)}, and not a "
                           "hub id of the form owner/name")
    repo = source or BIOGPT_TOKENIZER[0]
    revision = BIOGPT_TOKENIZER[1] if repo == BIOGPT_TOKENIZER[0] else None
    advice = "pass --tokenizer DIR, a folder holding BioGPT's vocab.json and merges.txt"
    files = [hub_download(repo, (name,), revision, advice) for name in TOKENIZER_FILES]  # offline, gated or absent
    return BioGptTokenizer(*map(str, files)), f"{repo}@{revision}" if revision else repo


def load_report_state(model: PrismReportModel, state: dict[str, torch.Tensor], source: str) -> None:
    """The published file into `model`, strictly: every tensor of the resampler and the decoder by its published
    name and shape (shared and tied tensors under any one of their names), nothing left over but the
    contrastive head."""
    from extract.slide_encoders.weights import load_slide_state

    own = {k: v for k, v in state.items() if not k.startswith(CONTRASTIVE_PREFIXES)}
    if not any(k.startswith("text_decoder.") for k in own):
        raise EncoderError(f"{source} holds no text_decoder.* tensors: a report needs the whole paige-ai/Prism "
                           "model.safetensors (the resampler alone makes slide embeddings, not reports)")
    load_slide_state(model, own, "", (), source)
    model.text_decoder.model.tie()


@dataclass
class PrismReporter:
    """PRISM's resampler and decoder, frozen, with the tokenizer and what the weights were."""

    model: PrismReportModel
    tokenizer: Any
    weights_id: str
    weights_sha256: str | None
    tokenizer_id: str
    seed: int = 0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_new_tokens(self) -> int:
        """The tokens the decoder can add after its BOS: its learned positions end there (1024 for PRISM)."""
        return int(self.model.text_decoder.config.max_position_embeddings) - 1

    @property
    def tile_dim(self) -> int:
        return int(self.model.image_resampler.perceiver.layers[0]["xattn"]["xattn"].to_kv.in_features)

    def slide_encoder(self) -> Any:
        """The resampler as extract's SlideEncoder (prism, or prism-random without a file): the store checks
        of `extract slide-embeddings` apply as they are."""
        from dataclasses import replace

        from extract.slide_encoders import SlideEncoder, registered_slide_encoder

        spec = registered_slide_encoder("prism" if self.weights_sha256 else "prism-random")
        spec = replace(spec, arch={**spec.arch, "context_dim": self.tile_dim,
                                   "latent_dim": self.model.image_resampler.embedding_dim})
        return SlideEncoder(spec, self.model.image_resampler, self.weights_id, self.weights_sha256)

    @torch.inference_mode()
    def generate(self, features: torch.Tensor | Any, num_beams: int = 5, max_new_tokens: int = 128) -> list[int]:
        """One slide's tile features (N, tile_dim) → the report's token ids (no prompt, no EOS)."""
        from extract.slide_encoders.tiles import as_tiles

        param = next(self.model.parameters())
        tiles, _ = as_tiles(features, torch.zeros(len(features), 2), 1.0, self.tile_dim, "PRISM", param.device,
                            param.dtype)
        latents = self.model.image_resampler(tiles[None])[1]
        if not bool(torch.isfinite(latents).all()):
            raise EncoderError(f"PRISM's resampler gave NaN/Inf latents at {latents.dtype}: run at fp32 "
                               "(--precision fp32)")
        eos = int(self.tokenizer.eos_token_id)  # BioGPT's BOS is its EOS: the prompt Prism.generate starts from
        return beam_search(self.model.text_decoder, latents, [eos], eos, num_beams, max_new_tokens)

    def text(self, token_ids: list[int]) -> str:
        return " ".join(self.tokenizer.decode(token_ids, skip_special_tokens=True).split())

    def describe(self) -> dict[str, Any]:
        return {"model": PRISM_HUB_ID, "weights_id": self.weights_id, "weights_sha256": self.weights_sha256,
                "tokenizer": self.tokenizer_id, "seed": self.seed if self.weights_sha256 is None else None}


def load_prism_reporter(weights: str = PRISM_HUB_ID, tokenizer: str | None = None,
                        device: str | torch.device = "cpu", seed: int = 0) -> PrismReporter:
    """PRISM's reporter from `weights`: the hub id (HF_TOKEN), a model.safetensors or its folder (a config.json
    beside it in the hub's format sets the architecture, else PRISM's), or `prism-random` (the full architecture,
    random init from `seed`). The tokenizer: see load_biogpt_tokenizer."""
    path = None if weights == RANDOM_WEIGHTS else resolve_weights_file(weights, ("model.safetensors",), "PRISM")
    resampler, decoder, context = read_architecture(None if path is None else path.parent / "config.json")
    tok, tokenizer_id = load_biogpt_tokenizer(tokenizer, path)
    if len(tok) > decoder["vocab_size"]:
        raise EncoderError(f"the tokenizer {tokenizer_id} has {len(tok)} tokens but the decoder's vocabulary "
                           f"{decoder['vocab_size']}: pass PRISM's own (BioGPT's) with --tokenizer")
    # a file fills a meta model (nothing initialised to throw away); the random twin draws from `seed`
    with torch.random.fork_rng(devices=[]), torch.device("meta") if path is not None else contextlib.nullcontext():
        torch.manual_seed(seed)
        model = PrismReportModel(resampler, decoder, context)
    if path is not None:
        load_report_state(model, read_state_dict(path), str(path))
        weights_id = path.name if Path(weights).expanduser().exists() else weights
        digest: str | None = sha256_file(path)
    else:
        weights_id, digest = f"random-init:seed={seed}", None
    model.eval().requires_grad_(False).to(device)
    return PrismReporter(model, tok, weights_id, digest, tokenizer_id, seed)
