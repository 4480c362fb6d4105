"""Tiny random-weight components: the whole pipeline, real code paths, in seconds on any CPU.

Nothing here is a stand-in for the engine: the demo runs the same DiT, KV cache, autoencoders, text
encoder and tokenizer code as the real model, only with tiny widths and random weights (the output is
coloured noise shaped by the input — every interface labels it as such).
"""

from __future__ import annotations

import string

import torch

DEMO_LABEL = "demo model (tiny, RANDOM WEIGHTS — not the real StreamDiffusionV2; run `wanstream download`)"
DEMO_TEXT_LEN = 64  # tokens per prompt in the demo (the real model uses 512)


def demo_tokenizer():  # -> transformers.PreTrainedTokenizerFast
    """A small Unigram tokenizer in the umT5 conventions (pad 0, </s> 1, unk 2, '▁' word boundaries)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = " ".join(
        [
            "a an the of in on with and at by to from is are cat dog city night neon light sky sea forest",
            "robot painting style cyberpunk anime watercolor oil portrait landscape street rain snow fire",
            "glowing golden dark bright soft detailed photorealistic cinematic futuristic ancient grass",
        ]
    ).split(" ")
    chars = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(f"▁{w}", -2.0 - i * 0.01) for i, w in enumerate(words)]
    vocab += [("▁", -3.0)] + [(c, -5.0) for c in chars] + [(f"▁{c}", -5.5) for c in chars]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def _randomize(module: torch.nn.Module, seed: int, gain: float = 1.0) -> None:
    """Seeded random weights everywhere (official inits zero some layers, e.g. the DiT head). `gain` scales
    the matrices: √2 (He) keeps a deep ReLU network's activations from dying out layer by layer."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                fan_in = p[0].numel()
                p.copy_(gain * torch.randn(p.shape, generator=gen) / fan_in**0.5)
            elif name.endswith(("weight", "gamma")):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))


def demo_components(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    num_layers: int = 2,
    text_encoder: bool = True,
):
    """Every network of the pipeline at toy size with seeded random weights (no files, no download).

    `num_layers`: DiT depth (a multi-GPU ring needs at least one block per rank). `text_encoder=False`
    skips the text encoder and its tokenizer (ranks that never encode prompts); other weights are the same."""
    from wanstream.engine.components import Components
    from wanstream.models.dit import WanConfig, WanDiT
    from wanstream.models.tae import TAEHV, TAEHVConfig
    from wanstream.models.text import PromptTokenizer, TextEncoder, UMT5Config, UMT5Encoder
    from wanstream.models.vace import VaceModule
    from wanstream.models.vae import WanVAE, WanVAEConfig

    device = torch.device(device)
    tokenizer = PromptTokenizer(demo_tokenizer(), text_len=DEMO_TEXT_LEN) if text_encoder else None
    t5 = (
        UMT5Encoder(
            UMT5Config(
                vocab=len(tokenizer.tokenizer), dim=64, dim_attn=64, dim_ffn=128, num_heads=2, num_layers=2
            )
        )
        if tokenizer is not None
        else None
    )
    dit = WanDiT(
        WanConfig(
            dim=64,
            ffn_dim=128,
            num_heads=2,
            num_layers=num_layers,
            text_len=DEMO_TEXT_LEN,
            text_dim=64,
            freq_dim=64,
        )
    )
    vae = WanVAE(WanVAEConfig(dim=8, num_res_blocks=1))
    # TAEHV at 1/32 of its widths (2-8 channels): the demo's default codec (generate --demo, serve --demo),
    # so the demo stays interactive at the input's own size on a CPU — about 8 fps at 640×360 on one
    # core. The Wan VAE cannot: its 3-D convolutions at full resolution take seconds a chunk even this
    # narrow (PyTorch's CPU path for them is slow at few channels); it stays for --vae wan.
    tae = TAEHV(TAEHVConfig.taew2_1(width_divisor=32))
    vace = VaceModule(dit.config)  # one VACE block (on layer 0): control video, masks, references
    for i, module in enumerate((t5, dit, vae, tae, vace)):
        if module is None:
            continue
        # TAEHV is ReLUs all the way: at 2-8 channels a unit gain leaves its output a near-constant colour.
        _randomize(module, seed + i, gain=2**0.5 if module is tae else 1.0)
        module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return Components(
        dit=dit,
        device=device,
        dtype=dtype,
        wan_vae=vae,
        taehv=tae,
        text_encoder=TextEncoder(t5, tokenizer) if t5 is not None and tokenizer is not None else None,
        vace=vace,
        label=DEMO_LABEL,
        demo=True,
    )
