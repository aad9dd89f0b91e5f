"""PRISM's report decoder (extract/slide_encoders/prism_decoder.py): the full architecture takes a state dict of
exactly the published names and shapes (tests/extract/published_keys.py, written from the public model code),
built on the meta device; a tiny random reporter decodes with its cache as without, generates the same ids for a
slide every time and other ids for another slide, reads the latents (zeroed latents change the report), and
padding (tiles in a batch, latents masked out) changes nothing; the tokenizer reads BioGPT's format."""

from __future__ import annotations

import pytest
import torch

from extract.slide_encoders.prism_decoder import (
    PrismReportModel,
    beam_search,
    load_biogpt_tokenizer,
    load_prism_reporter,
    load_report_state,
)
from slidecache.errors import EncoderError
from tests.extract import published_keys as published
from tests.extract.prism_tiny import WORDS, slide_features, tiny_model, write_tokenizer, write_weights_folder

EOS = 2  # BioGPT's </s>, also the prompt Prism.generate starts from


def _published_file(keep: str = "embed_tokens") -> dict[str, torch.Tensor]:
    """Meta tensors under the names paige-ai/Prism's model.safetensors holds: one name per shared resampler
    tensor, the tied output projection under `keep`'s name, the contrastive head."""
    resampler, groups = published.prism()
    names = {f"image_resampler.{group[0]}": resampler[group[0]] for group in groups}
    decoder, tied = published.prism_text_decoder()
    dropped = [n for n in tied[0] if keep not in n]
    names |= {k: v for k, v in decoder.items() if k not in dropped} | published.PRISM_CONTRASTIVE
    return {k: torch.empty(shape, device="meta") for k, shape in names.items()}


def _full_model() -> PrismReportModel:
    with torch.device("meta"):
        return PrismReportModel()


@pytest.mark.parametrize("keep", ["embed_tokens", "output_projection"])
def test_the_full_reporter_takes_exactly_the_published_names_and_shapes(keep):
    model = _full_model()
    resampler, _ = published.prism()
    decoder, _ = published.prism_text_decoder()
    expected = {f"image_resampler.{k}": v for k, v in resampler.items()} | decoder
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    load_report_state(model, _published_file(keep), "model.safetensors")  # strict, on the meta device
    tied = model.text_decoder.model
    assert tied.output_projection.weight is tied.biogpt.embed_tokens.weight


def test_a_file_that_is_not_the_published_model_is_refused_naming_what_differs():
    state = _published_file()
    del state["text_decoder.model.biogpt.layers.23.x_attn.k_proj.weight"]
    with pytest.raises(EncoderError, match=r"1 missing keys .*layers\.23\.x_attn\.k_proj\.weight"):
        load_report_state(_full_model(), state, "model.safetensors")
    state = _published_file() | {"text_decoder.model.biogpt.layers.0.x_attn.q_proj.weight": torch.empty(
        1024, 1024, device="meta")}  # a cross-attention in the lower half: not PRISM's
    with pytest.raises(EncoderError, match=r"1 unexpected .*layers\.0\.x_attn"):
        load_report_state(_full_model(), state, "model.safetensors")
    state = _published_file()
    state["text_decoder.model.biogpt.layers.12.x_attn.k_proj.weight"] = torch.empty(1024, 1024, device="meta")
    with pytest.raises(EncoderError, match=r"1 of another shape .*file \(1024, 1024\), model \(1024, 1280\)"):
        load_report_state(_full_model(), state, "model.safetensors")
    resampler_only = {k: v for k, v in _published_file().items() if k.startswith("image_resampler.")}
    with pytest.raises(EncoderError, match="holds no text_decoder"):
        load_report_state(_full_model(), resampler_only, "prism-slide-encoder.safetensors")


def _latents(model: PrismReportModel, seed: int) -> torch.Tensor:
    return model.image_resampler(torch.from_numpy(slide_features(seed))[None])[1]


@torch.inference_mode()
def test_decoding_with_the_cache_gives_the_logits_of_the_whole_sequence():
    model = tiny_model()
    latents = _latents(model, 0)
    ids = torch.tensor([[EOS, 7, 9, 11, 5, 30]])
    whole = model.text_decoder(ids, latents)
    state = model.text_decoder.start(latents)
    stepped = [model.text_decoder.step(ids[:, :3], state)] + [model.text_decoder.step(ids[:, i:i + 1], state)
                                                               for i in range(3, 6)]
    torch.testing.assert_close(torch.cat(stepped, 1), whole, rtol=0, atol=1e-5)


@torch.inference_mode()
def test_a_slide_gets_the_same_ids_every_time_and_another_slide_other_ids():
    model = tiny_model()
    decoder = model.text_decoder
    reports = [beam_search(decoder, _latents(model, seed), [EOS], EOS, 5, 12) for seed in (0, 1, 2)]
    assert beam_search(decoder, _latents(model, 0), [EOS], EOS, 5, 12) == reports[0]
    assert all(0 < len(r) <= 12 and EOS not in r for r in reports)
    assert len({tuple(r) for r in reports}) == 3, reports
    greedy = beam_search(decoder, _latents(model, 0), [EOS], EOS, 1, 12)  # greedy: the argmax at each step
    logits = decoder(torch.tensor([[EOS, *greedy]]), _latents(model, 0))[0]
    assert logits[:-1].argmax(-1).tolist() == greedy


@torch.inference_mode()
def test_the_decoder_reads_the_latents():
    model = tiny_model()
    latents = _latents(model, 1)
    report = beam_search(model.text_decoder, latents, [EOS], EOS, 5, 12)
    assert beam_search(model.text_decoder, torch.zeros_like(latents), [EOS], EOS, 5, 12) != report


@torch.inference_mode()
def test_padding_changes_nothing():
    model = tiny_model()
    small, large = torch.from_numpy(slide_features(1, n=10)), torch.from_numpy(slide_features(2, n=30))
    alone = model.image_resampler(small[None])[1]
    batch = torch.zeros(2, 30, 2560)
    batch[0, :10], batch[1] = small, large
    mask = torch.zeros(2, 30, dtype=torch.bool)
    mask[0, :10], mask[1] = True, True
    padded = model.image_resampler(batch, mask)[1][:1]
    torch.testing.assert_close(padded, alone, rtol=0, atol=1e-5)
    report = beam_search(model.text_decoder, alone, [EOS], EOS, 5, 12)
    assert beam_search(model.text_decoder, padded, [EOS], EOS, 5, 12) == report
    junk = torch.cat([alone, torch.randn(1, 5, alone.shape[-1]) * 10], 1)  # latents of no slide, masked out
    latent_mask = torch.ones(1, junk.shape[1], dtype=torch.bool)
    latent_mask[0, alone.shape[1]:] = False
    assert beam_search(model.text_decoder, junk, [EOS], EOS, 5, 12, context_mask=latent_mask) == report
    assert beam_search(model.text_decoder, junk, [EOS], EOS, 5, 12) != report  # unmasked, they are read


def test_the_tokenizer_reads_biogpt_files_and_decodes_the_reports(tmp_path):
    write_tokenizer(tmp_path)
    tokenizer, source = load_biogpt_tokenizer(str(tmp_path))
    assert source == str(tmp_path) and len(tokenizer) == 40 and tokenizer.eos_token_id == EOS
    assert tokenizer.decode([4, 5, 6, EOS], skip_special_tokens=True) == " ".join(WORDS[:3])
    with pytest.raises(EncoderError, match="not a folder holding vocab.json and merges.txt"):
        load_biogpt_tokenizer(str(tmp_path / "absent"))


def test_the_reporter_loads_a_folder_with_its_config_and_tokenizer(tmp_path):
    weights = write_weights_folder(tmp_path / "prism")
    reporter = load_prism_reporter(str(weights))
    assert reporter.weights_id == "model.safetensors" and len(reporter.weights_sha256) == 64
    assert reporter.tokenizer_id == str(tmp_path / "prism") and reporter.tile_dim == 2560
    ids = reporter.generate(slide_features(0), num_beams=5, max_new_tokens=12)
    with torch.inference_mode():
        assert ids == beam_search(tiny_model().text_decoder, _latents(tiny_model(), 0), [EOS], EOS, 5, 12)
    assert reporter.text(ids) and all(word in WORDS for word in reporter.text(ids).split())
    with pytest.raises(EncoderError, match="no tiles"):
        reporter.generate(slide_features(0, n=0))
