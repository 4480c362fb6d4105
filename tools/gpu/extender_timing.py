"""Prompt-extender timing on the GPU with a full-size, random-weight Qwen2.5-1.5B-Instruct (no download).

The model is built from Qwen2.5-1.5B-Instruct's published config (28 layers, hidden 1536, 12 heads / 2 KV heads,
vocab 151,936: the same compute as the real model), saved in the hub's file layout with the test suite's small
byte-level BPE tokenizer and ChatML template, and loaded through the product's own path (`LocalBackend` →
`PromptExtender`). Random weights almost never emit the end-of-turn token, so every answer runs to the
extender's `max_new_tokens`: the figures are the worst case (the real model stops after its paragraph, about
150-250 tokens). Usage (device machine, repo root, after `source tools/gpu/env.sh`):
    python3 tools/gpu/extender_timing.py OUT.json
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from wanstream.engine.random_weights import demo_tokenizer
from wanstream.models.text import PromptTokenizer
from wanstream.prompting.backends import LocalBackend
from wanstream.prompting.extend import PromptExtender, umt5_counter

from support.tiny_instruct import write_tiny_instruct

QWEN25_15B = dict(  # Qwen/Qwen2.5-1.5B-Instruct config.json
    vocab_size=151936,
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)


DEVICE = "cuda"


def write_full_size(folder: Path) -> Path:
    from safetensors.torch import save_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    write_tiny_instruct(folder)  # tokenizer, template, generation config; the weights are replaced below
    small = Qwen2Config.from_pretrained(folder).to_dict()
    known = small["vocab_size"]  # the small tokenizer's vocabulary
    small.pop("layer_types", None)  # derived from the layer count: rebuilt by the constructor
    config = Qwen2Config(**{**small, **QWEN25_15B})
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    # Ids past the small tokenizer's vocabulary would decode to nothing: generation suppresses them (the head
    # still computes all 151,936 logits, as the real model does).
    generation = json.loads((folder / "generation_config.json").read_text())
    generation["suppress_tokens"] = list(range(known, config.vocab_size))
    (folder / "generation_config.json").write_text(json.dumps(generation))
    config.save_pretrained(folder)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    del model, state
    return folder


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def main(out: str) -> None:
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    result: dict = {"device": name, "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        folder = write_full_size(Path(tmp) / "Qwen2.5-1.5B-Instruct")
        result["write_s"] = time.perf_counter() - t0
        result["weights_gib"] = (folder / "model.safetensors").stat().st_size / 2**30
        backend = LocalBackend(folder, device=DEVICE)
        t0 = time.perf_counter()
        backend.load()
        sync()
        result["load_s"] = time.perf_counter() - t0
        if DEVICE == "cuda":
            result["gpu_memory_gib"] = torch.cuda.memory_allocated() / 2**30
        extender = PromptExtender(
            backend, umt5_counter(PromptTokenizer(demo_tokenizer())), cache=None, timeout_s=120
        )
        prompts = [
            "a cartoon dog jumping and then running",
            "a neon city street at night in the rain",
            "an old man playing chess in a park, autumn",
        ]
        runs = []
        for i, prompt in enumerate(prompts):
            t0 = time.perf_counter()
            ext = extender.extend(prompt, seed=i)
            runs.append({"prompt": prompt, "s": time.perf_counter() - t0, "truncated": ext.truncated})
        result["max_new_tokens"] = extender.max_new_tokens
        result["extend_s"] = runs
        # Decode speed alone: one generate of exactly N new tokens (EOS suppressed by random weights).
        tok, model = backend._tokenizer, backend._model
        ids = tok.apply_chat_template(
            [{"role": "user", "content": prompts[0]}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        ids = {k: v.to(DEVICE) for k, v in ids.items()}
        per_token = []
        for n in (32, 256):
            sync()
            t0 = time.perf_counter()
            out_ids = model.generate(  # no suppression list: the real model's per-token cost
                **ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, suppress_tokens=None
            )
            sync()
            dt = time.perf_counter() - t0
            per_token.append({"new_tokens": int(out_ids.shape[1] - ids["input_ids"].shape[1]), "s": dt})
        result["generate"] = per_token
        (a, b) = per_token
        result["ms_per_token"] = (b["s"] - a["s"]) / (b["new_tokens"] - a["new_tokens"]) * 1000
        result["estimate_200_tokens_s"] = a["s"] + (200 - a["new_tokens"]) * result["ms_per_token"] / 1000
        result["extend_median_s"] = statistics.median(r["s"] for r in runs)
    print(json.dumps(result, indent=1))
    Path(out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    if "--cpu-smoke" in sys.argv:  # checks the script itself: a 2-layer model of the same family on the CPU
        DEVICE = "cpu"
        QWEN25_15B.update(
            hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, vocab_size=2000
        )
        sys.argv.remove("--cpu-smoke")
    main(sys.argv[1] if len(sys.argv) > 1 else "extender_timing.json")
