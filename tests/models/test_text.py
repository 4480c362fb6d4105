"""umT5 encoder, its loaders and the prompt tokenizer.

Full-size key layout on the meta device; the golden case; bf16 `.pth` and fp8 safetensors written here
and loaded through `load_umt5`; trimmed == full-length encoding; a tiny SentencePiece tokenizer
trained here and saved in the `google/umt5-xxl` folder layout drives the real tokenizer wrapper.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from wanstream.conformance import GoldenCase, run_case
from wanstream.models.text import (
    PromptTokenizer,
    TextEncoder,
    TokenizedPrompts,
    UMT5Config,
    UMT5Encoder,
    clean_prompt,
    encode_context,
    relative_position_buckets,
)
from wanstream.weights.loaders import CheckpointError
from wanstream.weights.text import load_text_encoder, load_tokenizer, load_umt5

GOLDEN = Path(__file__).parent.parent / "golden"

# models_t5_umt5-xxl-enc-bf16.pth: 242 tensors.
OFFICIAL_BLOCK = [
    "norm1.weight",
    "attn.q.weight",
    "attn.k.weight",
    "attn.v.weight",
    "attn.o.weight",
    "norm2.weight",
    "ffn.gate.0.weight",
    "ffn.fc1.weight",
    "ffn.fc2.weight",
    "pos_embedding.embedding.weight",
]


def official_keys(num_layers: int) -> set[str]:
    blocks = {f"blocks.{i}.{k}" for i in range(num_layers) for k in OFFICIAL_BLOCK}
    return {"token_embedding.weight", "norm.weight"} | blocks


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------------------------------
# Architecture
# ------------------------------------------------------------------------------------------------
def test_full_size_umt5_xxl_on_meta_matches_the_official_checkpoint() -> None:
    with torch.device("meta"):
        model = UMT5Encoder(UMT5Config.umt5_xxl())
    sd = model.state_dict()
    assert len(sd) == 242
    assert set(sd) == official_keys(24)
    # 256,384 × 4096 embedding + 24 × (4 × 4096² attention + 3 × 4096 × 10240 FFN + 2 × 4096 norms
    # + 32 × 64 bias table) + 4096 final norm.
    assert sum(p.numel() for p in model.parameters()) == 5_680_910_336
    assert tuple(sd["token_embedding.weight"].shape) == (256_384, 4096)
    assert tuple(sd["blocks.0.attn.q.weight"].shape) == (4096, 4096)
    assert tuple(sd["blocks.23.ffn.gate.0.weight"].shape) == (10_240, 4096)
    assert tuple(sd["blocks.23.ffn.fc2.weight"].shape) == (4096, 10_240)
    assert tuple(sd["blocks.5.pos_embedding.embedding.weight"].shape) == (32, 64)


def test_config_from_the_reference_builder_arguments() -> None:
    cfg = UMT5Config.from_dict(
        {"vocab_size": 512, "dim": 48, "dim_attn": 64, "dim_ffn": 96, "num_heads": 4, "encoder_layers": 3,
         "num_buckets": 32, "shared_pos": False, "dropout": 0.1}
    )  # fmt: skip
    assert (cfg.vocab, cfg.num_layers, cfg.head_dim, cfg.max_distance) == (512, 3, 16, 128)
    with pytest.raises(ValueError, match="shared_pos"):
        UMT5Config.from_dict({"shared_pos": True})
    with pytest.raises(ValueError, match="divisible"):
        UMT5Config(dim_attn=100, num_heads=64)


def test_relative_position_buckets_by_hand() -> None:
    b = relative_position_buckets(300, num_buckets=32, max_distance=128)
    q = 150  # query position; keys before it use buckets 0..15, keys after it 16..31
    by_offset = {0: 0, -1: 1, -7: 7, -40: 12, -100: 15, -150: 15, 1: 17, 7: 23, 40: 28, 100: 31, 149: 31}
    for offset, bucket in by_offset.items():
        assert int(b[q, q + offset]) == bucket, offset
    # Only offsets matter: every diagonal is constant.
    assert torch.equal(b[1:, 1:], b[:-1, :-1])


def test_the_golden_t5_encoder_case_passes() -> None:
    outcome = run_case(GoldenCase(GOLDEN / "t5_encoder.json"))
    failed = [f"{c.name}: {c.detail}" for c in outcome.report.checks if not c.passed]
    assert outcome.status == "PASS", outcome.message or failed
    names = {c.name for c in outcome.report.checks}
    assert {"intermediates/rel_buckets", "outputs/encoder_out", "outputs/context_official/1"} <= names


# ------------------------------------------------------------------------------------------------
# A tiny random encoder (dim_attn != dim on purpose)
# ------------------------------------------------------------------------------------------------
TINY = UMT5Config(vocab=160, dim=32, dim_attn=48, dim_ffn=64, num_heads=4, num_layers=2)


def tiny_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    sd = UMT5Encoder(TINY).state_dict()
    out = {}
    for name, t in sd.items():
        if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
            out[name] = 1 + 0.2 * torch.randn_like(t)
        elif "pos_embedding" in name:
            out[name] = 0.5 * torch.randn_like(t)
        elif name == "token_embedding.weight":
            out[name] = torch.randn_like(t)
        else:  # linear layers: unit-variance outputs, as a trained T5 roughly keeps them
            out[name] = torch.randn_like(t) / t.shape[1] ** 0.5
    return out


def fp32_model(sd: dict[str, torch.Tensor]) -> UMT5Encoder:
    model = UMT5Encoder(TINY)
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    return model.eval().requires_grad_(False)


def batch(lengths: list[int], width: int, seed: int = 1) -> TokenizedPrompts:
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, : n - 1] = torch.randint(3, TINY.vocab, (n - 1,), generator=g)
        ids[b, n - 1] = 1  # </s>
        mask[b, :n] = 1
    return TokenizedPrompts.from_mask(ids, mask)


@torch.inference_mode()
def test_trimmed_encode_equals_the_full_padded_encode() -> None:
    model = fp32_model(tiny_state_dict())
    tokens = batch([5, 17, 9], width=40)
    trimmed = encode_context(model, tokens)
    full = encode_context(model, tokens, trim=False)
    assert trimmed.shape == full.shape == (3, 40, TINY.dim)
    for b, n in enumerate([5, 17, 9]):
        assert torch.count_nonzero(trimmed[b, n:]) == 0 and torch.count_nonzero(full[b, n:]) == 0
        assert torch.all(trimmed[b, :n].abs().sum(-1) > 0)
        # Each prompt alone, with no padding at all: the same rows up to float32 rounding (the
        # masked and unmasked attention kernels sum in different orders).
        alone = model(tokens.ids[b : b + 1, :n])[0]
        assert rel_l2(trimmed[b, :n], alone) < 2e-6 and rel_l2(full[b, :n], alone) < 2e-6
    assert rel_l2(trimmed, full) < 2e-6
    # The raw encoder's padded rows are computed (non-zero); only the context zeroes them.
    raw = model(tokens.ids, tokens.mask)
    assert torch.all(raw[0, 5:].abs().sum(-1) > 0)


def test_tokenized_prompts_reject_left_padding_and_empty_rows() -> None:
    ids = torch.ones(2, 6, dtype=torch.long)
    with pytest.raises(ValueError, match="right padding"):
        TokenizedPrompts.from_mask(ids, torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="no tokens"):
        TokenizedPrompts.from_mask(ids, torch.tensor([[1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]]))


# ------------------------------------------------------------------------------------------------
# Checkpoints: the official bf16 .pth and the ComfyUI fp8 safetensors
# ------------------------------------------------------------------------------------------------
# bf16 compute vs float32 on the same weights: measured 0.8–1.2e-2 rel-L2 on these tiny random models
# (seeds 0–5), for bf16 weights and for fp8 weights upcast per layer alike (fp8 storage changes the
# weights, not the arithmetic: the float32 reference uses the same fp8-rounded values).
BF16_BOUND = 3e-2


@torch.inference_mode()
def test_bf16_pth_loads_and_matches_float32(tmp_path: Path) -> None:
    sd = {k: v.to(torch.bfloat16) for k, v in tiny_state_dict().items()}
    path = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    torch.save(sd, path)
    reference = fp32_model(sd)  # the same (bf16-exact) values in float32
    tokens = batch([6, 11], width=16)
    expected = reference(tokens.ids, tokens.mask)

    model = load_umt5(path, dtype=torch.float32)  # config inferred from the shapes
    assert model.config == TINY
    assert not any(p.requires_grad for p in model.parameters())
    assert torch.equal(model(tokens.ids, tokens.mask), expected)

    model_bf16 = load_umt5(path, TINY, dtype=torch.bfloat16)
    assert {p.dtype for p in model_bf16.parameters()} == {torch.bfloat16}
    out = model_bf16(tokens.ids, tokens.mask)
    assert out.dtype == torch.bfloat16
    assert rel_l2(out, expected) < BF16_BOUND


@torch.inference_mode()
def test_fp8_safetensors_upcast_at_load_or_kept_fp8(tmp_path: Path) -> None:
    sd = {k: v.to(torch.float8_e4m3fn) for k, v in tiny_state_dict(seed=5).items()}
    sd["spiece_model"] = torch.arange(16, dtype=torch.uint8)  # ComfyUI's embedded tokenizer: ignored
    path = tmp_path / "umt5-xxl-enc-fp8_e4m3fn.safetensors"
    save_file(sd, str(path))
    reference = fp32_model({k: v for k, v in sd.items() if k != "spiece_model"})
    tokens = batch([3, 14], width=20, seed=4)
    expected = reference(tokens.ids, tokens.mask)

    upcast = load_umt5(path, dtype=torch.float32)
    assert {p.dtype for p in upcast.parameters()} == {torch.float32}
    assert torch.equal(upcast(tokens.ids, tokens.mask), expected)

    kept = load_umt5(path, dtype=torch.float32, weight_dtype=torch.float8_e4m3fn)
    kept_sd = kept.state_dict()
    assert kept_sd["token_embedding.weight"].dtype == torch.float8_e4m3fn
    assert kept_sd["blocks.1.ffn.gate.0.weight"].dtype == torch.float8_e4m3fn
    assert kept_sd["blocks.1.norm2.weight"].dtype == torch.float32
    assert kept_sd["blocks.0.pos_embedding.embedding.weight"].dtype == torch.float32
    assert torch.equal(
        kept_sd["blocks.0.attn.q.weight"].view(torch.uint8), sd["blocks.0.attn.q.weight"].view(torch.uint8)
    )
    assert torch.equal(kept(tokens.ids, tokens.mask), expected)  # per-layer upcast: same arithmetic

    kept_bf16 = load_umt5(path, dtype=torch.bfloat16, weight_dtype=torch.float8_e4m3fn)
    assert rel_l2(kept_bf16(tokens.ids, tokens.mask), expected) < BF16_BOUND


def test_quantizing_a_wider_checkpoint_to_fp8_checks_the_range(tmp_path: Path) -> None:
    sd = tiny_state_dict()
    model = load_umt5(sd, dtype=torch.float32, weight_dtype=torch.float8_e4m3fn)
    assert model.blocks[0].attn.k.weight.dtype == torch.float8_e4m3fn
    sd["blocks.1.attn.v.weight"][0, 0] = 1000.0
    with pytest.raises(CheckpointError, match=r"blocks\.1\.attn\.v\.weight reaches 1000"):
        load_umt5(sd, dtype=torch.float32, weight_dtype=torch.float8_e4m3fn, source="big.pth")


def test_bad_checkpoints_name_the_file_and_the_problem(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pth"):
        load_umt5(tmp_path / "nowhere.pth")

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"garbage\.pth"):
        load_umt5(garbage)

    dit = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({"patch_embedding.weight": torch.zeros(4, 4)}, str(dit))
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.safetensors: not a umT5 encoder"):
        load_umt5(dit)

    hf = {
        "shared.weight": torch.zeros(4, 4),
        "encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(4, 4),
    }
    with pytest.raises(CheckpointError, match="transformers UMT5EncoderModel"):
        load_umt5(hf, source="hf.safetensors")

    sd = tiny_state_dict()
    del sd["blocks.1.ffn.fc2.weight"]
    with pytest.raises(CheckpointError, match=r"t5\.pth: .*missing keys: blocks\.1\.ffn\.fc2\.weight"):
        load_umt5(sd, source="t5.pth")

    with pytest.raises(CheckpointError, match=r"wrong shapes: token_embedding\.weight"):
        load_umt5(
            tiny_state_dict(),
            UMT5Config(vocab=999, dim=32, dim_attn=48, dim_ffn=64, num_heads=4, num_layers=2),
        )

    with pytest.raises(CheckpointError, match=r"unexpected keys: blocks\.1\."):
        load_umt5(
            tiny_state_dict(),
            UMT5Config(vocab=160, dim=32, dim_attn=48, dim_ffn=64, num_heads=4, num_layers=1),
        )


# ------------------------------------------------------------------------------------------------
# Tokenizer: a tiny SentencePiece unigram model in the google/umt5-xxl folder layout
# ------------------------------------------------------------------------------------------------
CORPUS = [
    "a cat sitting on a mat",
    "the quick brown fox jumps over the lazy dog",
    "a photo of a dog running in the park at sunset",
    "a video of waves crashing on rocks & cliffs",
    "neon city lights at night, rain, reflections",
    "ein Hund läuft über die Wiese, café",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import sentencepiece as spm
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("wan") / "google" / "umt5-xxl"
    folder.mkdir(parents=True)
    model = io.BytesIO()
    # umT5's special ids: pad 0, </s> 1, unk 2, no <s>.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_writer=model, vocab_size=60, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    (folder / "spiece.model").write_bytes(model.getvalue())
    special = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    config = {"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "model_max_length": 512, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    # tokenizer.json, as shipped next to spiece.model, converted from it once.
    AutoTokenizer.from_pretrained(str(folder)).backend_tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def test_clean_prompt_matches_the_reference_cleaning() -> None:
    assert clean_prompt("  a   cat\n\ton \u3000 a mat  ") == "a cat on a mat"
    assert clean_prompt("rocks &amp;amp; cliffs") == "rocks & cliffs"  # unescaped twice
    assert clean_prompt("cafÃ©") == "café"  # ftfy repairs mojibake


def test_tokenizer_appends_eos_pads_to_512_and_reports_lengths(tokenizer_dir: Path) -> None:
    tok = load_tokenizer(tokenizer_dir)
    raw = tok.tokenizer
    assert (raw.pad_token_id, raw.eos_token_id, raw.unk_token_id) == (0, 1, 2)
    out = tok(["a cat on a mat", "", "  neon   city\nlights at night  "])
    assert out.ids.shape == out.mask.shape == (3, 512)
    expected_lengths = [
        len(raw(clean_prompt(p)).input_ids) for p in ("a cat on a mat", "", "neon city lights at night")
    ]
    assert out.lengths.tolist() == expected_lengths
    assert expected_lengths[1] == 1  # an empty prompt is just </s>
    for b, n in enumerate(expected_lengths):
        assert int(out.ids[b, n - 1]) == 1  # </s> last
        assert torch.all(out.ids[b, n:] == 0) and torch.all(out.mask[b, n:] == 0)
        assert torch.all(out.mask[b, :n] == 1) and torch.all(out.ids[b, : n - 1] > 1)
    # Whitespace is collapsed before tokenizing: the messy prompt tokenizes like the clean one.
    assert torch.equal(out.ids[2], tok(["neon city lights at night"]).ids[0])
    assert torch.equal(tok("a cat on a mat").ids, out.ids[:1])  # a single string is a batch of one


def test_tokenizer_truncates_and_keeps_eos(tokenizer_dir: Path) -> None:
    tok = load_tokenizer(tokenizer_dir, text_len=8)
    long = "the quick brown fox jumps over the lazy dog " * 3
    out = tok([long, "a cat"])
    full = tok.tokenizer(clean_prompt(long)).input_ids
    assert len(full) > 8
    assert out.lengths.tolist()[0] == 8
    assert out.ids[0].tolist() == [*full[:7], 1]


def test_tokenizer_folder_errors(tmp_path: Path, tokenizer_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing-folder: tokenizer folder not found"):
        load_tokenizer(tmp_path / "missing-folder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty: no tokenizer files"):
        load_tokenizer(tmp_path / "empty")
    wan_root = tokenizer_dir.parent.parent  # holds google/umt5-xxl
    with pytest.raises(FileNotFoundError, match=r"did you mean .*google/umt5-xxl"):
        load_tokenizer(wan_root)
    afile = tmp_path / "spiece.model"
    afile.write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match=r"spiece\.model"):
        load_tokenizer(afile)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="broken: cannot load the tokenizer"):
        load_tokenizer(broken)


@torch.inference_mode()
def test_text_encoder_end_to_end(tokenizer_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "t5.pth"
    torch.save({k: v.to(torch.bfloat16) for k, v in tiny_state_dict(seed=7).items()}, path)
    encoder = load_text_encoder(path, tokenizer_dir, dtype=torch.float32)
    assert (encoder.dtype, encoder.device) == (torch.float32, torch.device("cpu"))
    prompts = ["a cat on a mat", "neon city lights at night, rain"]
    context = encoder.encode(prompts)
    lengths = encoder.tokenize(prompts).lengths.tolist()
    assert context.shape == (2, 512, TINY.dim)
    for b, n in enumerate(lengths):
        assert torch.count_nonzero(context[b, n:]) == 0
        ids = encoder.tokenize([prompts[b]]).ids[:, :n]
        assert rel_l2(context[b, :n], encoder.model(ids)[0]) < 2e-6
    assert torch.equal(encoder(prompts), context)  # callable, for the engine's embedding cache

    small = UMT5Encoder(UMT5Config(vocab=40, dim=32, dim_attn=48, dim_ffn=64, num_heads=4, num_layers=1))
    mismatched = TextEncoder(small, encoder.tokenizer)
    with pytest.raises(ValueError, match=r"produced id \d+ but the encoder's vocabulary has 40 rows"):
        mismatched.encode(CORPUS)
    with pytest.raises(TypeError, match="not a fast"):
        PromptTokenizer(object())  # type: ignore[arg-type]
