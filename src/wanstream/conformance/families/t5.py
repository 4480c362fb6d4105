"""`t5_encoder`: the umT5 encoder on padded ids + mask, and both wrappers' post-processing.

Weights come from the case's `<case>.pth` (the official bf16 format; the case's `weights/*` tensors
when it ships no side file) through `load_umt5`. Checked, where the case records them: the
relative-position buckets (exact), the token embedding, each recorded layer's bias, every block's
output, the raw encoder output (padded rows included), Wan2.1's per-prompt truncated context and
StreamDiffusionV2's zeroed full-length context. The contexts go through `encode_context` (what
`TextEncoder` runs), both trimmed to the real tokens (our default) and over every position.
"""

from __future__ import annotations

import torch

from wanstream.conformance.case import CaseError, CaseReport, GoldenCase
from wanstream.conformance.runner import RunOptions
from wanstream.models.text import TokenizedPrompts, UMT5Config, encode_context
from wanstream.weights.text import load_umt5


def run(case: GoldenCase, report: CaseReport, options: RunOptions) -> None:
    config = UMT5Config.from_dict(case.manifest["model_config"])
    side_file = case.directory / f"{case.manifest_path.stem}.pth"
    checkpoint = side_file if side_file.is_file() else case.prefixed("weights/")
    model = load_umt5(checkpoint, config, dtype=options.dtype, device=options.device, source=case.name)
    bound = options.bound(case.tolerance("tolerance.suggested_rel_l2", default=5e-5))
    gold = case.tensors
    dev = options.device
    ids, mask = case.tensor("inputs/ids").to(dev), case.tensor("inputs/mask").to(dev)
    tokens = TokenizedPrompts.from_mask(ids, mask)
    buckets = model.buckets(ids.shape[1])

    if "intermediates/rel_buckets" in gold:
        report.exact("intermediates/rel_buckets", buckets.cpu(), gold["intermediates/rel_buckets"])
    if "intermediates/token_embedding" in gold:
        report.compare(
            "intermediates/token_embedding", model.embed(ids), gold["intermediates/token_embedding"], bound
        )
    for layer, golden in sorted(case.prefixed("intermediates/pos_bias/").items(), key=lambda kv: int(kv[0])):
        ours = model.blocks[int(layer)].pos_embedding(buckets)
        report.compare(f"intermediates/pos_bias/{layer}", ours, golden, bound)

    hidden: list[torch.Tensor] = []
    out = model(ids, mask, hidden_states=hidden)
    block_outs = case.prefixed("intermediates/block_out/")
    if block_outs and len(block_outs) != len(hidden):
        raise CaseError(
            f"{case.name}: {len(block_outs)} block outputs recorded, the model has {len(hidden)} blocks"
        )
    for i in range(len(block_outs)):
        report.compare(f"intermediates/block_out/{i}", hidden[i], block_outs[str(i)], bound)
    report.compare("outputs/encoder_out", out, case.tensor("outputs/encoder_out"), bound)

    trimmed = encode_context(model, tokens)
    full = encode_context(model, tokens, trim=False)
    lengths = tokens.lengths.tolist()
    official = case.prefixed("outputs/context_official/")
    if official and sorted(official, key=int) != [str(b) for b in range(len(lengths))]:
        raise CaseError(
            f"{case.name}: context_official has entries {sorted(official)}, expected one per prompt"
        )
    for b, n in enumerate(lengths if official else []):
        report.compare(f"outputs/context_official/{b}", trimmed[b, :n], official[str(b)], bound)
    golden_sdv2 = case.tensor("outputs/context_sdv2")
    report.compare("outputs/context_sdv2 (trimmed encode)", trimmed, golden_sdv2, bound)
    report.compare("outputs/context_sdv2 (full-length encode)", full, golden_sdv2, bound)
    if official:
        # The manifest's equivalence claim, on the golden tensors themselves: Wan2.1's list
        # zero-padded to the padded length is StreamDiffusionV2's context.
        padded = torch.zeros_like(golden_sdv2)
        for b, n in enumerate(lengths):
            padded[b, :n] = official[str(b)]
        report.exact("equivalence: zero-padded context_official == context_sdv2", padded, golden_sdv2)
