"""Networks with random weights and no files: the full-size model for measuring (`bench`, `Pipeline.random_weights`,
the ring check) and the tiny demo model (`--demo`, tests), both as the `Components` a session runs on.

Nothing here is a stand-in for the engine: the same DiT, KV cache, autoencoders, text encoder and tokenizer
code runs, only with random weights (the full-size networks do the real work; the demo's output is coloured
noise shaped by the input, and every interface labels it as such). It lives in the engine, the layer of
`Components`, so the layers above — parallel/, bench, the pipeline — share this one factory and its one
randomiser; weights/ turns files into tensors and never builds engine objects.
"""

from __future__ import annotations

import math
import string
from typing import TYPE_CHECKING, Any

import torch

from wanstream.engine.components import Components
from wanstream.models.dit import WanConfig, WanDiT

if TYPE_CHECKING:  # the text encoder's module needs ftfy/regex: imported only when one is built
    from wanstream.models.text import TextEncoder

DEMO_LABEL = "demo model (tiny, RANDOM WEIGHTS — not the real StreamDiffusionV2; run `wanstream download`)"
DEMO_TEXT_LEN = 64  # tokens per prompt in the demo (the real model uses 512)


def randomize_(module: torch.nn.Module, seed: int = 0, gain: float = 1.0) -> torch.nn.Module:
    """Seeded random weights on the module's own device, everywhere (official inits zero some layers, e.g.
    the DiT head): N(0, gain²/fan_in) matrices, norms ~1, small biases. `gain` √2 (He) keeps a deep ReLU
    network's activations from dying out layer by layer."""
    params = list(module.named_parameters())
    if not params:
        return module
    gen = torch.Generator(device=params[0][1].device).manual_seed(seed)
    with torch.no_grad():
        for name, p in params:
            if p.dim() >= 2:
                p.normal_(0.0, gain / math.sqrt(p[0].numel()), generator=gen)
            elif name.endswith(("weight", "gamma")):
                p.normal_(1.0, 0.1, generator=gen)
            else:
                p.normal_(0.0, 0.05, generator=gen)
    return module


def _on_device(factory: Any, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    with torch.device("meta"):
        module = factory()
    # Cast on meta (free), then allocate once in the target dtype.
    return module.to(dtype).to_empty(device=device).eval().requires_grad_(False)


def random_components(
    device: torch.device,
    dtype: torch.dtype = torch.bfloat16,
    tiny: bool = False,
    *,
    precision: str = "bf16",
    text_encoder: str | None = None,
    vace: bool = False,
) -> Components:
    """Random networks at full size (or tiny). `precision="fp8"`: the DiT blocks' linear weights stored in
    float8 (computing in float8 where the GPU can); `text_encoder`: also a random umT5 ("gpu", "fp8", "host"
    or "auto", as `Pipeline.load` places it), else none (a random conditioning stands in); `vace`: also a
    random VACE module (1.3B: 15 blocks)."""
    from wanstream.models.placement import apply_precision_, check_precision, resolve_text_placement
    from wanstream.models.tae import TAEHV, TAEHVConfig
    from wanstream.models.vae import WanVAE, WanVAEConfig

    check_precision(precision)
    placement = resolve_text_placement(text_encoder, device) if text_encoder is not None else None

    if tiny:
        dit_cfg = WanConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_len=64, text_dim=64)
        vae_cfg, tae_cfg = WanVAEConfig(dim=8, num_res_blocks=1), TAEHVConfig.taew2_1(width_divisor=8)
    else:
        dit_cfg, vae_cfg, tae_cfg = WanConfig.t2v_1_3b(), WanVAEConfig(), TAEHVConfig()
    # The text encoder first: its "host" and "fp8" forms are built through the device, one block at a time.
    text = random_text_encoder(device, dtype, placement, tiny, dit_cfg.text_len) if placement else None
    dit = randomize_(_on_device(lambda: WanDiT(dit_cfg), device, dtype), 1)
    apply_precision_(dit, precision, device)
    vae = randomize_(_on_device(lambda: WanVAE(vae_cfg), device, dtype), 2)
    tae_dtype = torch.float16 if device.type == "cuda" else dtype
    tae = randomize_(_on_device(lambda: TAEHV(tae_cfg), device, tae_dtype), 3)
    vace_module = None
    if vace:
        from wanstream.models.vace import VaceModule

        vace_module = randomize_(_on_device(lambda: VaceModule(dit_cfg), device, dtype), 4)
    label = (
        "tiny random weights"
        if tiny
        else "full-size 1.3B, RANDOM WEIGHTS (no download; compute is identical)"
    )
    return Components(
        dit=dit,
        device=device,
        dtype=dtype,
        wan_vae=vae,
        taehv=tae,
        text_encoder=text,
        vace=vace_module,
        label=label,
        precision=precision,
        text_placement=placement or "none",
        tiny=tiny,
    )


def random_text_encoder(
    device: torch.device, dtype: torch.dtype, placement: str, tiny: bool, text_len: int
) -> TextEncoder:
    """A random umT5 (umT5-XXL, or a tiny one) with a word-hash tokenizer (`HashTokenizer`: the real one
    is a download): the work per token is the real encoder's. Each part is made and randomised on the
    device, then placed: moved to host memory ("host"), converted to float8 ("fp8"), or left ("gpu")."""
    from wanstream.models.fp8 import quantize_embedding_, quantize_linears_
    from wanstream.models.offload import HostTextEncoder
    from wanstream.models.text import PromptTokenizer, TextEncoder, UMT5Config, UMT5Encoder

    if tiny:
        cfg = UMT5Config(vocab=256, dim=64, dim_attn=64, dim_ffn=128, num_heads=2, num_layers=2)
    else:
        cfg = UMT5Config.umt5_xxl()
    tokenizer = PromptTokenizer(HashTokenizer(cfg.vocab), text_len=text_len)
    with torch.device("meta"):
        model = UMT5Encoder(cfg)
    model = model.to(dtype).eval().requires_grad_(False)
    parts = [model.token_embedding, *model.blocks, model.norm]
    for i, part in enumerate(parts):
        randomize_(part.to_empty(device=device), 10 + i)
        if placement == "fp8":
            if isinstance(part, torch.nn.Embedding):
                quantize_embedding_(part)
            else:
                quantize_linears_(part)
        elif placement == "host":
            part.to("cpu")
    if placement == "host":
        return HostTextEncoder(model, tokenizer, device)
    return TextEncoder(model, tokenizer)


class HashTokenizer:
    """umT5's conventions (pad 0, </s> 1, right padding) with one token per word, the id a hash of the word:
    enough for random weights (no tokenizer files, no transformers), same shapes and cost per token."""

    is_fast = True  # what PromptTokenizer asks of a tokenizer

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab

    def __len__(self) -> int:
        return self.vocab

    def ids(self, text: str) -> list[int]:
        import zlib

        return [3 + zlib.crc32(w.encode()) % (self.vocab - 3) for w in text.split()] + [1]

    def __call__(self, text: str | list[str], **kwargs: Any) -> dict[str, Any]:
        if isinstance(text, str):
            return {"input_ids": self.ids(text)}
        width = int(kwargs.get("max_length", 512))
        rows = [self.ids(t) for t in text]
        rows = [row if len(row) <= width else [*row[: width - 1], 1] for row in rows]  # keep </s>
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask}


# The tiny demo model
# ------------------------------------------------------------------------------------------------
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
        randomize_(module, seed + i, gain=2**0.5 if module is tae else 1.0)
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
        weights_seed=seed,
        demo=True,
    )
