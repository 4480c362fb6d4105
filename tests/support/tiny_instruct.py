"""A tiny random Qwen2 instruct model in the layout of the hub's Qwen2.5-*-Instruct repos, built locally.

The weights are random (the output is gibberish) but every file is the real format: `config.json`,
`generation_config.json`, `model.safetensors`, a byte-level BPE `tokenizer.json` (with `vocab.json`,
`merges.txt`) trained here with `tokenizers`, and a `tokenizer_config.json` carrying a ChatML chat template as Qwen's does. It loads
through `transformers.AutoModelForCausalLM` / `AutoTokenizer` exactly as the real model does.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# The ChatML template Qwen2.5 instruct models use (system, user and assistant turns).
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CORPUS = [
    "a cartoon dog jumping and then running through a sunny park",
    "the camera slowly pans across a misty forest at dawn, soft golden light",
    "un chat roux dort sur un rebord de fenêtre, lumière douce du matin",
    "cinematic, highly detailed, vivid colors, smooth motion, wide shot",
    "You rewrite short video prompts into one detailed paragraph.",
] * 20


def tiny_tokenizer():  # -> tokenizers.Tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=list(SPECIAL),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def write_tiny_instruct(folder: Path, seed: int = 0) -> Path:
    """Write the tiny model's files into `folder` (created); returns it."""
    from safetensors.torch import save_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer()
    tokenizer_json = tok.to_str()
    vocab = json.loads(tokenizer_json)["model"]["vocab"]
    ids = {t: vocab[t] for t in SPECIAL}
    config = Qwen2Config(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    config.save_pretrained(folder)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    generation = {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|im_end|>"]]}
    (folder / "generation_config.json").write_text(json.dumps(generation))
    (folder / "tokenizer.json").write_text(tokenizer_json)
    tok.model.save(str(folder))  # vocab.json and merges.txt, as the hub's repos also carry them
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "chat_template": CHAT_TEMPLATE,
                "model_max_length": 2048,
            }
        )
    )
    return folder
