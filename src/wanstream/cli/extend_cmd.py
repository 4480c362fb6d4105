"""`wanstream extend "a prompt"`: print the prompt extended into one detailed paragraph (docs/prompts.md).

The extended text goes to stdout (nothing else does, so it can be piped); what ran, the token count and
whether it came from the cache go to stderr. Exit codes: 0 done, 2 bad input, 1 the extender failed or is
not downloaded (the message says the download command), 124 timed out, 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from wanstream.prompting.extend import DEFAULT_TIMEOUT_S


def add_extender_flags(p: argparse.ArgumentParser) -> None:
    """The flags that choose and bound the extender (shared by `extend`, `generate` and `serve`)."""
    g = p.add_argument_group("prompt extender (docs/prompts.md)")
    g.add_argument(
        "--extender-url",
        metavar="URL",
        help="an OpenAI-compatible endpoint (e.g. https://api.openai.com/v1 or a local vLLM/Ollama) instead of "
        "the local model; its key comes from WANSTREAM_EXTENDER_API_KEY",
    )
    g.add_argument(
        "--extender-model", metavar="NAME", help="the endpoint's model name (default: gpt-4o-mini)"
    )
    g.add_argument(
        "--extender-device",
        default="auto",
        metavar="DEV",
        help="where the local model runs: auto (the GPU when it has room, else the CPU), cuda, cpu",
    )
    g.add_argument(
        "--extender-timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="S",
        help="give up on one extension after S seconds (default: %(default)g)",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "extend",
        help="extend a short prompt into a detailed one (local instruct model or an OpenAI-compatible endpoint)",
        description=(
            "Rewrite a short prompt as one detailed paragraph (subject, motion, style, camera, lighting; what you "
            "wrote is kept; the prompt's language; at most 512 umT5 tokens). Runs the instruct model fetched by "
            "`wanstream download --with-prompt-extender`, or --extender-url. The same prompt, model and seed "
            "give the same text, and are answered from a cache after the first time."
        ),
    )
    p.add_argument("prompt", help="the prompt to extend ('-': read it from stdin)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    p.add_argument("--models-dir", metavar="DIR", help="where the model files are (see `wanstream models`)")
    p.add_argument(
        "--no-cache", action="store_true", help="always ask the model (and do not store the answer)"
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON (prompt, text, tokens, ...)")
    add_extender_flags(p)
    p.set_defaults(handler=run)


def build_from_args(
    args: argparse.Namespace, *, cache: bool = True, tokenizer: Any = None
):  # -> PromptExtender
    """The extender the flags describe; `tokenizer`: the pipeline's, when it is not the downloaded umT5 one."""
    from wanstream.prompting.backends import build_extender

    return build_extender(
        tokenizer=tokenizer,
        models_dir=args.models_dir,
        url=args.extender_url,
        model=args.extender_model,
        device=args.extender_device,
        cache=cache,
        timeout_s=args.extender_timeout,
    )


def run(args: argparse.Namespace) -> int:
    from wanstream.prompting.extend import ExtendError, ExtendTimeout, check_prompt
    from wanstream.weights.store import MissingWeightsError

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    try:
        prompt = check_prompt(prompt)
        if args.extender_timeout <= 0:
            raise ValueError(f"--extender-timeout must be positive, got {args.extender_timeout}")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        extender = build_from_args(args, cache=not args.no_cache)
        result = extender.extend(prompt, seed=args.seed)
    except MissingWeightsError as exc:
        print(f"error: the prompt extender is not downloaded.\n{exc}", file=sys.stderr)
        return 1
    except ExtendTimeout as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 124
    except (ExtendError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result.to_dict(), ensure_ascii=False, indent=2))
        return 0
    print(result.text)
    source = "cache" if result.cached else f"{result.seconds:.1f} s"
    cut = ", cut to fit" if result.truncated else ""
    print(
        f"[{result.model}, seed {result.seed}, {result.umt5_tokens} umT5 tokens{cut}, {source}]",
        file=sys.stderr,
    )
    return 0
