"""The training loss from logits at the supervised positions only vs. over the full (B, L, V) logits, side by
side in one run: same model, same batch, same loss value (checked), seconds per optimiser step.

Qwen2's vocabulary has 151,936 entries, so the LM head's logits and their gradient dominate a step when the
decoder is small (tiny-qwen2) or the answers are short next to the prompt and visual tokens.

    python bench/loss_bench.py [--llm tiny-qwen2 qwen2-0.5b-random] [--tiles 32] [--batch 4] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.train_bench import REPORT, SYSTEM_MESSAGE  # noqa: E402
from train.checkpoint import ModelSpec, build_model  # noqa: E402
from train.data import Collator, ConversationEncoder  # noqa: E402
from train.llm import load_llm  # noqa: E402

DIM = 2560


def batch_for(loaded, tiles: int, size: int) -> dict:
    encoder = ConversationEncoder(loaded.tokenizer, SYSTEM_MESSAGE)
    turns = [{"from": "human", "value": "<image>\nWrite the pathology report."}, {"from": "gpt", "value": REPORT}]
    items = []
    for i in range(size):
        ids, labels = encoder.encode(turns, [tiles - i])  # unequal visual lengths, as in a real batch
        items.append({"input_ids": ids, "labels": labels, "tiles": torch.randn(tiles - i, DIM).numpy()})
    return Collator(loaded.tokenizer.pad_token_id)(items)


def training_loss(model, batch: dict, full: bool) -> torch.Tensor:
    """The SlideVLM's training loss (supervised positions only), or the LLM's own over the full logits."""
    if not full:
        return model(**batch).loss
    embeddings = model.embed(batch["input_ids"], batch["tiles"], batch["tile_mask"])
    return model.llm(inputs_embeds=embeddings, attention_mask=batch["attention_mask"], labels=batch["labels"],
                     use_cache=False).loss


def seconds_per_step(model, batch: dict, full: bool, steps: int) -> float:
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    training_loss(model, batch, full).backward()  # warm-up
    optimiser.zero_grad(set_to_none=True)
    started = time.perf_counter()
    for _ in range(steps):
        training_loss(model, batch, full).backward()
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)
    return (time.perf_counter() - started) / steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llm", nargs="+", default=["tiny-qwen2", "qwen2-0.5b-random"])
    parser.add_argument("--tiles", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    rows = []
    for name in args.llm:
        loaded = load_llm(name)
        spec = ModelSpec(name, DIM, args.tiles, 16, 0.0, 0, False, SYSTEM_MESSAGE, "bench")
        model = build_model(spec, loaded)
        batch = batch_for(loaded, args.tiles, args.batch)
        model.train()
        with torch.no_grad():  # the same parameters for both: the losses must agree
            full_loss, fast_loss = (float(training_loss(model, batch, f)) for f in (True, False))
        full = seconds_per_step(model, batch, True, args.steps)
        fast = seconds_per_step(model, batch, False, args.steps)
        supervised = int((batch["labels"][:, 1:] != -100).sum())
        row = {"llm": name, "batch": args.batch, "sequence": int(batch["input_ids"].shape[1]),
               "supervised_tokens": supervised, "full_logits_s_per_step": round(full, 4),
               "supervised_logits_s_per_step": round(fast, 4), "speedup": round(full / fast, 2),
               "loss_full": full_loss, "loss_supervised": fast_loss}
        assert abs(full_loss - fast_loss) <= 1e-4 * abs(full_loss), row  # the same loss, computed cheaper
        rows.append(row)
        print(json.dumps(row))
    print(json.dumps({"machine": platform.platform(), "threads": torch.get_num_threads()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
