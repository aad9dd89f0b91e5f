"""The published parameter names and shapes of each architecture, written out here from the public model code (not
read back from ours, and no weights): what `model.state_dict()` of that code holds, with the prefix or checkpoint
key under which the hub file stores it. The tests load a state dict of exactly these names and shapes strictly.

    PRISM       DIAGNijmegen/unicorn_baseline @ dec380918e3b, src/unicorn_baseline/vision_language/prism/
                perceiver.py (PerceiverResampler, Perceiver, CrossAttention, MHSA, FeedForward) and config.json
                (a copy of the paige-ai/Prism hub code); modeling_prism.py for the rest of the file.
    TITAN       the same repository, src/unicorn_baseline/vision/pathology/titan/vision_transformer.py
                (VisionTransformer, Block, Attention, AttentionalPooler) and config.json (the MahmoodLab/TITAN
                hub code); modeling_titan.py: vision_encoder + text_encoder.
    GigaPath    prov-gigapath/prov-gigapath @ 09d8e876afb9, gigapath/slide_encoder.py (LongNetViT, PatchEmbed),
                gigapath/torchscale/architecture/encoder.py (Encoder, EncoderLayer), component/
                multihead_attention.py, feedforward_network.py, model/LongNetConfig.py (LongNet_12_layers_768_dim).
    CONCH v1.5  mahmoodlab/TRIDENT @ a91fa8490e02, trident/patch_encoder_models/model_zoo/conchv1_5/conchv1_5.py
                (CONCHVisionTower: trunk = vit_large at 224 px, attn_pool_contrast, ln_contrast)."""

from __future__ import annotations

Shapes = dict[str, tuple[int, ...]]


def _norm(name: str, dim: int) -> Shapes:
    return {f"{name}.weight": (dim,), f"{name}.bias": (dim,)}


def _linear(name: str, out: int, inp: int, bias: bool = True) -> Shapes:
    return {f"{name}.weight": (out, inp), **({f"{name}.bias": (out,)} if bias else {})}


def prism(latent_seq: int = 512, dim: int = 1280, context: int = 2560, depth: int = 8, tf_depth: int = 6,
          share_xattn_from: int = 1, share_tf_from: int = 0) -> tuple[Shapes, list[list[str]]]:
    """`image_resampler` of Prism, unprefixed, every name the module tree gives (shared modules under each of
    their layers), and the groups of names that are one tensor (layers past share_*_from reuse that layer's)."""
    keys: Shapes = {**_norm("cls_norm", dim), **_norm("img_norm", dim), "perceiver.latents": (1 + latent_seq, dim)}

    def ff(p: str) -> Shapes:  # FeedForward(mult=1, geglu): net.0 Linear(dim, 2 dim), net.2 Linear(dim, dim)
        return {**_norm(f"{p}.norm", dim), **_linear(f"{p}.net.0", 2 * dim, dim), **_linear(f"{p}.net.2", dim, dim)}

    xattn: dict[int, Shapes] = {}
    tf: dict[int, Shapes] = {}
    for i in range(depth):
        x = f"perceiver.layers.{i}.xattn"
        xattn[i] = {**_norm(f"{x}.xattn.x_norm", dim), **_linear(f"{x}.xattn.to_q", dim, dim, bias=False),
                    **_linear(f"{x}.xattn.to_kv", 2 * dim, context, bias=False),
                    **_linear(f"{x}.xattn.to_out", dim, dim, bias=False), **ff(f"{x}.ff")}  # c_norm=False: none
        tf[i] = {}
        for j in range(tf_depth):
            t = f"perceiver.layers.{i}.tf.{j}"
            tf[i] |= {**_norm(f"{t}.mhsa.norm", dim), f"{t}.mhsa.mha.in_proj_weight": (3 * dim, dim),
                      f"{t}.mhsa.mha.out_proj.weight": (dim, dim), **ff(f"{t}.ff")}  # MultiheadAttention(bias=False)
        keys |= xattn[i] | tf[i]

    def owner(i: int, start: int) -> int:
        return min(i, start)

    groups: dict[str, list[str]] = {}
    for i in range(depth):
        for part, table, start in (("xattn", xattn, share_xattn_from), ("tf", tf, share_tf_from)):
            src = owner(i, start)
            for name in table[i]:
                first = name.replace(f"layers.{i}.{part}", f"layers.{src}.{part}", 1)
                groups.setdefault(first, []).append(name)
    for name in keys:
        if ".layers." not in name:
            groups[name] = [name]
    return keys, list(groups.values())


PRISM_OTHER = {  # the rest of paige-ai/Prism's model.safetensors (modeling_prism.py): not built here
    "text_decoder.model.biogpt.embed_tokens.weight": (42384, 1024), "img_to_latents.to_latents.weight": (5120, 1280),
    "text_to_latents.to_latents.weight": (5120, 1024), "temperature": (),
}


def prism_text_decoder(vocab: int = 42384, dim: int = 1024, layers: int = 24, ffn: int = 4096, context: int = 1280,
                       positions: int = 1024) -> tuple[Shapes, list[list[str]]]:
    """`text_decoder` of Prism, prefixed as the file holds it: biogpt.py's BioGPT wraps biogpt_hf.py's
    BioGptForCausalLM(x_attn_dim=biogpt_context_dim) as `model`: BioGptModel (`biogpt`: embed_tokens, learned
    positions of max_position_embeddings + 2 (BioGPT's offset), layers, layer_norm) and output_projection (no
    bias). Every BioGptAttention has biases; layers num_hidden_layers // 2 and up add x_attn_layer_norm and x_attn,
    whose k_proj and v_proj read the context_dim-wide latents. The second value: the one tied pair,
    output_projection.weight = embed_tokens.weight (`_tied_weights_keys`: save_pretrained keeps embed_tokens)."""
    p = "text_decoder.model."
    keys: Shapes = {f"{p}biogpt.embed_tokens.weight": (vocab, dim),
                    f"{p}biogpt.embed_positions.weight": (positions + 2, dim), **_norm(f"{p}biogpt.layer_norm", dim),
                    f"{p}output_projection.weight": (vocab, dim)}
    for i in range(layers):
        layer = f"{p}biogpt.layers.{i}"
        keys |= {**_norm(f"{layer}.self_attn_layer_norm", dim), **_norm(f"{layer}.final_layer_norm", dim),
                 **_linear(f"{layer}.fc1", ffn, dim), **_linear(f"{layer}.fc2", dim, ffn)}
        keys |= {k: v for proj in ("q_proj", "k_proj", "v_proj", "out_proj")
                 for k, v in _linear(f"{layer}.self_attn.{proj}", dim, dim).items()}
        if i >= layers // 2:
            keys |= {**_norm(f"{layer}.x_attn_layer_norm", dim), **_linear(f"{layer}.x_attn.q_proj", dim, dim),
                     **_linear(f"{layer}.x_attn.k_proj", dim, context),
                     **_linear(f"{layer}.x_attn.v_proj", dim, context),
                     **_linear(f"{layer}.x_attn.out_proj", dim, dim)}
    return keys, [[f"{p}biogpt.embed_tokens.weight", f"{p}output_projection.weight"]]


PRISM_CONTRASTIVE = {k: v for k, v in PRISM_OTHER.items() if not k.startswith("text_decoder.")}  # not built anywhere


def titan(dim: int = 768, depth: int = 6, tile: int = 768, mlp: int = 3072, queries: int = 128) -> Shapes:
    """`vision_encoder` of TITAN, unprefixed: mlp patch embed, class token, no position table (ALiBi), no layer
    scale (init_values None), blocks under CustomSequential's `modules_list`, CoCa poolers (torch's
    MultiheadAttention) and the text projection."""
    keys: Shapes = {"cls_token": (1, 1, dim), **_linear("patch_embed.0", dim, tile), **_norm("norm", dim),
                    "proj": (dim, dim)}
    for i in range(depth):
        b = f"blocks.modules_list.{i}"
        keys |= {**_norm(f"{b}.norm1", dim), **_linear(f"{b}.attn.qkv", 3 * dim, dim),
                 **_linear(f"{b}.attn.proj", dim, dim), **_norm(f"{b}.norm2", dim),
                 **_linear(f"{b}.mlp.fc1", mlp, dim), **_linear(f"{b}.mlp.fc2", dim, mlp)}
    for pool, n in (("attn_pool", queries), ("attn_pool_contrastive", 1)):
        keys |= {f"{pool}.query": (n, dim), f"{pool}.attn.in_proj_weight": (3 * dim, dim),
                 f"{pool}.attn.in_proj_bias": (3 * dim,), **_linear(f"{pool}.attn.out_proj", dim, dim),
                 **_norm(f"{pool}.ln_q", dim), **_norm(f"{pool}.ln_k", dim)}
    return keys


TITAN_OTHER = {"text_encoder.token_embedding.weight": (32007, 768)}  # modeling_titan.py's text tower


def gigapath_slide(dim: int = 768, depth: int = 12, tile: int = 1536, ffn: int = 3072) -> Shapes:
    """LongNetViT: patch embed, class token (pos_embed is a non-persistent buffer), LongNet encoder with subln
    (inner_attn_ln, ffn_layernorm) and its final layer_norm (normalize_output), the outer norm."""
    keys: Shapes = {"cls_token": (1, 1, dim), **_linear("patch_embed.proj", dim, tile), **_norm("norm", dim),
                    **_norm("encoder.layer_norm", dim)}
    for i in range(depth):
        layer = f"encoder.layers.{i}"
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            keys |= _linear(f"{layer}.self_attn.{proj}", dim, dim)
        keys |= {**_norm(f"{layer}.self_attn.inner_attn_ln", dim), **_norm(f"{layer}.self_attn_layer_norm", dim),
                 **_linear(f"{layer}.ffn.fc1", ffn, dim), **_linear(f"{layer}.ffn.fc2", dim, ffn),
                 **_norm(f"{layer}.ffn.ffn_layernorm", ffn), **_norm(f"{layer}.final_layer_norm", dim)}
    return keys


def conch_v15(dim: int = 1024, depth: int = 24, pooled: int = 768) -> Shapes:
    """CONCHVisionTower: timm-named ViT-L/16 trunk with layer scale (ls1/ls2.gamma), a 224 px position table
    (14 x 14 + class), and the contrastive attentional pooler (bias-free to_q/to_kv/to_out)."""
    keys: Shapes = {"trunk.cls_token": (1, 1, dim), "trunk.pos_embed": (1, 197, dim),
                    "trunk.patch_embed.proj.weight": (dim, 3, 16, 16), "trunk.patch_embed.proj.bias": (dim,),
                    **_norm("trunk.norm", dim)}
    for i in range(depth):
        b = f"trunk.blocks.{i}"
        keys |= {**_norm(f"{b}.norm1", dim), **_linear(f"{b}.attn.qkv", 3 * dim, dim),
                 **_linear(f"{b}.attn.proj", dim, dim), f"{b}.ls1.gamma": (dim,), **_norm(f"{b}.norm2", dim),
                 **_linear(f"{b}.mlp.fc1", 4 * dim, dim), **_linear(f"{b}.mlp.fc2", dim, 4 * dim),
                 f"{b}.ls2.gamma": (dim,)}
    keys |= {"attn_pool_contrast.query": (1, pooled), **_norm("attn_pool_contrast.ln_k", dim),
             **_norm("attn_pool_contrast.ln_q", pooled), **_linear("attn_pool_contrast.to_q", pooled, pooled, False),
             **_linear("attn_pool_contrast.to_kv", 2 * pooled, dim, False),
             **_linear("attn_pool_contrast.to_out", pooled, pooled, False), **_norm("ln_contrast", pooled)}
    return keys
