"""Time the generative head's constrained beam search: tree attention (``GenerativeRecommender.decode``)
against the former decoding, which gathered the prompt's cache to ``users x beams`` rows at every level.

The catalog, SIDs and histories are synthetic (Amazon-Beauty's scale by default: 12,101 items, four levels of
256 codes and a suffix level, 20-item histories) and the backbone is ``tiny`` or random weights of a
``config.json`` shape, so no data or weights are needed; only the cost of decoding is measured, and the two
decoders' lists are compared (same items, same scores up to the dtype's rounding).

    python bench/bench_generative_decode.py --backbone configs/backbones/smollm2-135m.json --dtype bfloat16 \\
        --users 22363 --batch_size 256
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mmrec.models.llm.backbone import BackboneSpec, load_backbone
from mmrec.models.llm.generative import GenerativeRecommender
from mmrec.models.llm.prompt import PromptSpec
from mmrec.models.llm.sid_trie import constrained_beam_search
from tests.fixtures import make_prepared_run
from tests.llm_helpers import run_inputs, write_sids

SHORT_PROMPT = PromptSpec(system=None, instruction="History:", question="Next?")
"""The byte-level tokenizer of ``tiny`` and shapes spends a token a byte: short texts keep the prompts near
the ~150 tokens SmolLM2's tokenizer gives Amazon-Beauty's prompts."""


def expanded_cache_decode(model: GenerativeRecommender, history: Tensor, mask: Tensor, num_beams: int) -> tuple[Tensor, Tensor]:
    """The former ``decode``: one cache row per beam, gathered by ``origin`` at every level (the baseline)."""
    ids, attention_mask, lengths = model._sequences(history, mask)
    positions = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
    out = model.decoder()(input_ids=ids, attention_mask=attention_mask, position_ids=positions, use_cache=True)
    cache = out.past_key_values
    batch = len(ids)
    first = out.last_hidden_state[torch.arange(batch, device=ids.device), lengths - 1]
    state = {"mask": attention_mask, "lengths": lengths}

    def step(depth: int, origin: Tensor | None, codes: Tensor | None) -> Tensor:
        if origin is None:
            return model.level_logprobs(first, 0).unsqueeze(1)
        beams_before = state["mask"].shape[0] // batch
        flat = (torch.arange(batch, device=origin.device).unsqueeze(1) * beams_before + origin).flatten()
        cache.reorder_cache(flat)
        state["mask"] = torch.cat([state["mask"][flat], state["mask"].new_ones(len(flat), 1)], dim=1)
        state["lengths"] = state["lengths"][flat]
        tokens = model.sid_token_ids[model.level_starts[depth - 1] + codes.flatten()].unsqueeze(1)
        positions = (state["lengths"] + depth - 1).unsqueeze(1)
        hidden = model.decoder()(
            input_ids=tokens, attention_mask=state["mask"], position_ids=positions, past_key_values=cache, use_cache=True,
        ).last_hidden_state[:, -1]
        return model.level_logprobs(hidden, depth).view(batch, origin.shape[1], -1)

    return constrained_beam_search(step, model.trie, batch, num_beams, ids.device)


def histories(num_users: int, num_items: int, min_len: int, max_len: int, seed: int) -> tuple[Tensor, Tensor]:
    """Left-padded random histories of ``min_len`` to ``max_len`` items (as the data module pads them)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len, max_len + 1, num_users)
    mask = torch.from_numpy(np.arange(max_len)[None, :] >= (max_len - lengths)[:, None])
    items = torch.from_numpy(rng.integers(0, num_items, (num_users, max_len))).masked_fill(~mask, 0)
    return items, mask


def run(
    decode, model: GenerativeRecommender, items: Tensor, mask: Tensor, batch_size: int, beams: int, autocast: bool,
) -> tuple[float, Tensor, Tensor, float]:
    """Wall time over all users, their items and scores, and the peak GPU memory in GB."""
    device = model.device
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    out_items, out_scores = [], []
    start = time.perf_counter()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        for begin in range(0, len(items), batch_size):
            found, scores = decode(model, items[begin:begin + batch_size].to(device), mask[begin:begin + batch_size].to(device), beams)
            out_items.append(found)
            out_scores.append(scores)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else 0.0
    return elapsed, torch.cat(out_items).cpu(), torch.cat(out_scores).cpu(), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="tiny", help="tiny, or a config.json shape (configs/backbones/)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--finetune", default="lora", choices=["lora", "full"], help="full: no adapter layers")
    parser.add_argument("--autocast", action="store_true", help="decode under bf16 autocast (as bf16-mixed validation)")
    parser.add_argument("--users", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--beams", type=int, default=20)
    parser.add_argument("--min_len", type=int, default=3, help="shortest history drawn")
    parser.add_argument("--max_len", type=int, default=20)
    parser.add_argument("--num_items", type=int, default=12101)
    parser.add_argument("--levels", type=int, default=4, help="quantizer levels (a suffix level is added)")
    parser.add_argument("--codebook_size", type=int, default=256)
    parser.add_argument("--skip_old", action="store_true", help="time tree attention only")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's top operators of one batch")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = make_prepared_run(Path(tmp) / "run", num_users=8, num_items=args.num_items)
        write_sids(run_dir, modalities=("text",), levels=args.levels, codebook_size=args.codebook_size, suffix=True)
        torch.manual_seed(0)
        # Built on the CPU, then moved: a shape's weights would start on the GPU, where the SID rows' CPU
        # initialisation cannot write into them.
        with mock.patch("torch.cuda.is_available", return_value=False):
            model = GenerativeRecommender(
                run_inputs(run_dir, GenerativeRecommender, sid_modality="text"), max_len=args.max_len, sid_modality="text",
                backbone=load_backbone(BackboneSpec(name_or_path=args.backbone, dtype=args.dtype, finetune=args.finetune)), prompt=SHORT_PROMPT,
            )
        model = model.to(device).eval()
    items, mask = histories(args.users, args.num_items, args.min_len, args.max_len, seed=0)
    prompt = model._sequences(items[:256].to(device), mask[:256].to(device))[2].float().mean()
    print(f"device {device}, backbone {args.backbone} ({args.dtype}, {args.finetune}, autocast {args.autocast}), {args.users} users, batch {args.batch_size}, "
          f"{args.beams} beams, levels {model.vocab.level_sizes}, mean prompt {prompt:.0f} tokens", flush=True)

    new = lambda model, history, mask, beams: model.decode(history, mask, beams)
    run(new, model, items[:args.batch_size], mask[:args.batch_size], args.batch_size, args.beams, args.autocast)  # warm-up
    if args.profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
            run(new, model, items[:args.batch_size], mask[:args.batch_size], args.batch_size, args.beams, args.autocast)
        sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=25), flush=True)
    seconds, new_items, new_scores, peak = run(new, model, items, mask, args.batch_size, args.beams, args.autocast)
    print(f"tree attention: {seconds:.2f} s ({args.users / seconds:.0f} users/s), peak {peak:.1f} GB", flush=True)
    if args.skip_old:
        return
    run(expanded_cache_decode, model, items[:args.batch_size], mask[:args.batch_size], args.batch_size, args.beams, args.autocast)
    seconds_old, old_items, old_scores, peak_old = run(expanded_cache_decode, model, items, mask, args.batch_size, args.beams, args.autocast)
    print(f"expanded cache: {seconds_old:.2f} s ({args.users / seconds_old:.0f} users/s), peak {peak_old:.1f} GB; "
          f"speed-up {seconds_old / seconds:.1f}x", flush=True)
    live = torch.isfinite(old_scores) & torch.isfinite(new_scores)
    print(f"agreement: top-1 {float((old_items[:, 0] == new_items[:, 0]).float().mean()):.4f}, "
          f"all beams {float((old_items == new_items).float().mean()):.4f}, "
          f"max |score diff| {float((old_scores - new_scores)[live].abs().max()):.2e}", flush=True)


if __name__ == "__main__":
    main()
