"""A tiny PRISM reporter for tests: the full architecture's code at toy widths that still reads 2560-d Virchow
tile features, a BioGPT-format vocabulary (vocab.json + merges.txt) of its 40 tokens, and the folder the command
reads (model.safetensors, config.json in the hub's format, the tokenizer files beside them).

Random init alone gives a decoder that repeats one token whatever the slide (the scaled token embeddings swamp
the cross-attention), so the helper gives it small token embeddings and a louder cross-attention output: its
reports then follow the latents, which is what the tests check."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_model

from extract.slide_encoders.prism_decoder import PRISM_DECODER_CONFIG, PrismReportModel

TINY_RESAMPLER = dict(latent_seq=8, latent_dim=32, context_dim=2560, mhsa_heads=4, perceiver_depth=2,
                      transformer_depth=1, share_xattn_start_layer=1, share_tf_start_layer=0, xattn_heads=1, mlp_mult=1)
WORDS = ["invasive", "ductal", "carcinoma", "grade", "1", "2", "3", "tumor", "necrosis", "present", "absent",
         "lymph", "node", "metastasis", "margin", "clear", "involved", "squamous", "cell", "adenocarcinoma", "of",
         "the", "lung", "breast", "colon", "well", "moderately", "poorly", "differentiated", "mucosa", "benign",
         "with", "and", "no", "high", "low"]
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # BioGPT's ids 0-3
TINY_DECODER = dict(PRISM_DECODER_CONFIG, vocab_size=len(SPECIALS) + len(WORDS), hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=64, max_position_embeddings=160)
TINY_CONTEXT = 32


def tiny_model(seed: int = 0) -> PrismReportModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = PrismReportModel(TINY_RESAMPLER, TINY_DECODER, TINY_CONTEXT)
        with torch.no_grad():
            model.text_decoder.model.biogpt.embed_tokens.weight.normal_(0, 0.05)
            for layer in model.text_decoder.model.biogpt.layers:
                if layer.cross_attends:
                    layer.x_attn.v_proj.weight.mul_(4)
                    layer.x_attn.out_proj.weight.mul_(8)
    return model.eval().requires_grad_(False)


def slide_features(seed: int, n: int = 40) -> np.ndarray:
    """One slide's (n, 2560) features, each slide its own mean and spread, as slides of different tissue differ."""
    rng = np.random.default_rng(seed)
    return (rng.normal(0, 1 + 2 * seed, (n, 2560)) + rng.normal(0, 3, 2560)).astype(np.float32)


def write_tokenizer(folder: Path) -> None:
    """BioGPT's format: vocab.json ({token: id}, words ending in </w>) and merges.txt (pair and count per line)."""
    vocab = {token: i for i, token in enumerate(SPECIALS + [f"{w}</w>" for w in WORDS])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("".join(f"{w[0]} {w[1:]}</w> 1\n" for w in WORDS if len(w) > 1))


def write_weights_folder(folder: Path, seed: int = 0) -> Path:
    """model.safetensors (one name per shared or tied tensor, as save_pretrained keeps), config.json in the hub's
    format, the tokenizer: what `--weights FOLDER/model.safetensors` reads."""
    folder.mkdir(parents=True, exist_ok=True)
    save_model(tiny_model(seed), str(folder / "model.safetensors"))
    config = {"model_type": "prism", "perceiver_config": TINY_RESAMPLER, "biogpt_config": TINY_DECODER,
              "biogpt_context_dim": TINY_CONTEXT, "dim_latents": 64}
    (folder / "config.json").write_text(json.dumps(config))
    write_tokenizer(folder)
    return folder / "model.safetensors"
