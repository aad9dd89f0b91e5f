"""The language model: a Qwen2 causal LM and its tokenizer, loaded without trust_remote_code.

Sources: a hub id (HF_TOKEN from the environment; never logged) or a local Qwen2 directory; an InternVL2
checkpoint directory (its `language_model.*` tensors and its own tokenizer, which already holds the image
tokens); `tiny-qwen2` — a seeded random two-layer Qwen2 with the real Qwen2 tokenizer, for tests and
the demo; or `qwen2-0.5b-random` — Qwen2-0.5B's architecture with random weights, for benchmarks. New image tokens take the spare rows of Qwen2's padded embedding matrix, set to the mean of
the trained rows; the matrix grows only when no spare row is left.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoTokenizer, PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM

from slidecache.errors import TrainingError
from train.tokenizer import IMAGE_TOKENS, IMG_CONTEXT, add_image_tokens, offline_qwen2_tokenizer

# PEFT 0.21 reads an attribute transformers 5.24 deprecated, on every adapter it wraps or loads: a warning
# between two of our pinned libraries that no user can act on (it printed on every `--slide` page).
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

TINY_QWEN2 = "tiny-qwen2"
# Weights drawn with std 1/sqrt(width): Qwen2's 0.02 suits width ~900; at width 64 it leaves every layer a
# near no-op (attention adds ~1% to the residual stream), and a reporter on it learnt to read the slide
# in one seed of three (issue 26: held-out stated grade 0.81, 0.67, 0.30; with 1/sqrt(width) 0.76, 0.71, 0.76).
TINY_CONFIG = dict(vocab_size=151_936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                   tie_word_embeddings=True, rope_theta=1_000_000.0, initializer_range=64**-0.5)
# Qwen2-0.5B-Instruct's architecture with seeded random weights: real shapes and speed, no download.
QWEN2_05B_RANDOM = "qwen2-0.5b-random"
QWEN2_05B_CONFIG = dict(vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                        tie_word_embeddings=True, rope_theta=1_000_000.0)
STAND_IN_CONFIGS = {TINY_QWEN2: TINY_CONFIG, QWEN2_05B_RANDOM: QWEN2_05B_CONFIG}
RANDOM_STAND_INS = tuple(STAND_IN_CONFIGS)
# What a stand-in was built from by checkpoints that predate recording it (ModelSpec.llm_config None).
LEGACY_STAND_IN_CONFIGS = {TINY_QWEN2: TINY_CONFIG | {"initializer_range": 0.02}, QWEN2_05B_RANDOM: QWEN2_05B_CONFIG}
# A trained LLM's embeddings are far from N(0, 0.02): at width 64 that init caps every logit near 1, so no
# prediction could ever be confident and a test's loss could not fall. tiny-qwen2 draws them with std 0.25.
TINY_EMBEDDING_STD = 0.25
INTERNVL_PREFIX = "language_model."


@dataclass
class LoadedLLM:
    model: Qwen2ForCausalLM
    tokenizer: PreTrainedTokenizerBase
    image_token_ids: dict[str, int]
    source: str  # what was loaded, for the run manifest
    new_token_rows: list[int]  # embedding rows set here (mean of trained rows)

    @property
    def img_context_id(self) -> int:
        return self.image_token_ids[IMG_CONTEXT]

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)


def _is_internvl_checkpoint(path: Path) -> bool:
    config = path / "config.json"
    return config.is_file() and "llm_config" in json.loads(config.read_text())


def _load_internvl_language_model(path: Path, dtype: torch.dtype) -> Qwen2ForCausalLM:
    config = json.loads((path / "config.json").read_text())["llm_config"]
    arch = (config.get("architectures") or ["?"])[0]
    if arch != "Qwen2ForCausalLM":
        raise TrainingError(f"{path}: the InternVL2 checkpoint's LLM is {arch}; slidecache loads Qwen2 LLMs")
    keys = {k: v for k, v in config.items() if k not in ("architectures", "auto_map", "_name_or_path")}
    model = Qwen2ForCausalLM(Qwen2Config(**keys)).to(dtype)
    state = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key.startswith(INTERNVL_PREFIX):
                    state[key[len(INTERNVL_PREFIX):]] = f.get_tensor(key)
    if not state:
        raise TrainingError(f"{path}: no {INTERNVL_PREFIX}* tensors in its .safetensors files")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise TrainingError(f"{path}: language model weights do not fit the config (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]})")
    model.tie_weights()
    return model


def _place_new_tokens(model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerBase, trained_rows: int) -> list[int]:
    """Rows for ids >= trained_rows are new: mean of the trained rows; grow the matrix only if needed."""
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    new_rows = list(range(trained_rows, len(tokenizer)))
    if new_rows:
        with torch.no_grad():
            embeddings = model.get_input_embeddings().weight
            embeddings[new_rows] = embeddings[:trained_rows].mean(0, keepdim=True)
            output = model.get_output_embeddings().weight
            if output.data_ptr() != embeddings.data_ptr():
                output[new_rows] = output[:trained_rows].mean(0, keepdim=True)
    return new_rows


def load_llm(source: str, dtype: torch.dtype = torch.float32, seed: int = 0,
             stand_in_config: dict | None = None) -> LoadedLLM:
    """`stand_in_config`: the architecture a random stand-in is built from (default: the current one; a checkpoint
    passes what it recorded, so it is rebuilt exactly as trained)."""
    path = Path(source)
    if source in STAND_IN_CONFIGS:
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(Qwen2Config(**(stand_in_config or STAND_IN_CONFIGS[source]))).to(dtype)
        if source == TINY_QWEN2:
            with torch.no_grad():
                model.get_input_embeddings().weight.normal_(0.0, TINY_EMBEDDING_STD)  # tied: lm_head too
        tokenizer = offline_qwen2_tokenizer()
    elif path.is_dir() and _is_internvl_checkpoint(path):
        model = _load_internvl_language_model(path, dtype)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    else:
        token = os.environ.get("HF_TOKEN")  # passed to the hub client only; never printed or stored
        try:
            model = Qwen2ForCausalLM.from_pretrained(source, dtype=dtype, token=token, trust_remote_code=False)
            tokenizer = AutoTokenizer.from_pretrained(source, token=token, trust_remote_code=False)
        except OSError as e:
            raise TrainingError(f"cannot load the LLM {source!r}: {e}. Give a local Qwen2 directory, an InternVL2 "
                                f"checkpoint directory, a hub id (with HF_TOKEN if gated, network access), or "
                                f"{TINY_QWEN2}") from e
    if model.config.model_type != "qwen2":
        raise TrainingError(f"{source}: a {model.config.model_type} model; slidecache trains Qwen2-family LLMs")
    trained_rows = len(tokenizer)
    ids = add_image_tokens(tokenizer)
    new_rows = _place_new_tokens(model, tokenizer, trained_rows)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = "<|endoftext|>"
    # ChatML turns end with <|im_end|>: generation stops there; padding uses <|endoftext|>.
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for config in (model.config, model.generation_config):
        config.eos_token_id = end_of_turn
        config.pad_token_id = tokenizer.pad_token_id
    for name in IMAGE_TOKENS:
        if ids[name] is None or ids[name] < 0:
            raise TrainingError(f"{source}: the tokenizer could not hold {name}")
    return LoadedLLM(model, tokenizer, ids, source, new_rows)
