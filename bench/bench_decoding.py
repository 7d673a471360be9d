"""Decoding options (issue 21) against plain decoding, measured side by side in the same run.

One 124M-shaped random-weight model is loaded once; each measure below prints its own table,
every figure a median over many decode steps, the two sides interleaved step by step so that the
machine's load (it is shared: noisy) falls on both alike.

- processors: a scheduler step with repetition, presence and frequency penalties,
  no-repeat-ngram 3 and min-p all on, against the same sampling without them; batch 1 and 8.
- speculative: a long greedy generation (where the model repeats itself, as random weights
  readily do) with prompt lookup K = 10 and with a small random draft model, against plain
  greedy: tokens per pass of the model, and speed.
- beam: beam search W = 4 against greedy, time per generated token (a decode step each),
  the two stepped in turn.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from bench.common import print_table, random_124m, verdict
from gpt2cli.config import GPT2Config
from gpt2cli.generate import Generation
from gpt2cli.model import GPT2
from gpt2cli.params import GenerationParams
from gpt2cli.scheduler import Request, Sample, Scheduler

PROMPT_TOKENS = 200  # each row's prompt: random ids, so the penalties see a real history
STEPS = 48  # decode steps timed per side and batch size
PLAIN = GenerationParams(max_tokens=STEPS + 1, ignore_eos=True)  # `gpt2 generate`'s sampling
PROCESSED = replace(
    PLAIN,
    repetition_penalty=1.2,
    presence_penalty=0.5,
    frequency_penalty=0.5,
    no_repeat_ngram=3,
    min_p=0.05,
)
TARGETS = {1: 1.1, 8: 1.15}  # a processed step's time at most this many times a plain one's


def running(model: GPT2, params: GenerationParams, batch: int) -> Scheduler:
    """A scheduler with `batch` one-sample requests (random prompts, seeds 0..) admitted."""
    rng = np.random.default_rng(0)
    scheduler = Scheduler(model, max_batch=batch, capacity=PROMPT_TOKENS + STEPS + 1)
    for seed in range(batch):
        prompt = rng.integers(0, model.tokenizer.n_vocab - 1, PROMPT_TOKENS).tolist()
        scheduler.submit(Request(prompt, replace(params, seed=seed)))
    scheduler.step()  # the prefill and first tokens: not a decode step
    return scheduler


def interleaved_steps(schedulers: list[Scheduler]) -> list[float]:
    """Median seconds of one decode step of each scheduler, over STEPS steps taken in turn."""
    times: list[list[float]] = [[] for _ in schedulers]
    for _ in range(STEPS):
        for scheduler, spent in zip(schedulers, times, strict=True):
            start = time.perf_counter()
            scheduler.step()
            spent.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def processors(model: GPT2) -> None:
    """A decode step with the logits processors and min-p on, against a plain one."""
    rows = []
    for batch, target in TARGETS.items():
        plain, processed = interleaved_steps(
            [running(model, PLAIN, batch), running(model, PROCESSED, batch)]
        )
        ratio = processed / plain
        rows.append(
            [
                batch,
                plain * 1e3,
                processed * 1e3,
                f"{ratio:.3f}x",
                f"<= {target:g}x",
                verdict(ratio <= target),
            ]
        )
    print_table(
        f"decoding: a decode step (ms, median of {STEPS}) with repetition 1.2 + presence 0.5 + "
        f"frequency 0.5 + no-repeat-ngram 3 + min-p 0.05 against plain sampling (top-k 5), "
        f"124M-shaped random weights, {PROMPT_TOKENS}-token prompts; {load()}",
        ["batch", "plain", "processed", "ratio", "target", ""],
        rows,
    )


def load() -> str:
    """The machine's load average now, which these figures depend on."""
    return "load average {:.1f} {:.1f} {:.1f}".format(*os.getloadavg())


SPECULATIVE_TOKENS = 256  # new tokens of the long greedy generation
SPECULATIVE_RUNS = 3  # runs of each way, taken in turn; the median is reported
# the draft model: a small random GPT-2 of the same vocabulary, about 6.5M parameters (wte)
DRAFT = GPT2Config(n_vocab=50257, n_ctx=1024, n_embd=128, n_head=4, n_layer=2)


def speculative(model: GPT2) -> None:
    """Prompt lookup K = 10 and a draft model (K = 5) against plain greedy, on one long greedy
    generation from a random 32-token prompt: decode passes of the model, tokens per pass (the
    first token comes from the prompt's pass), tokens/s (prefill included) and the speed-up;
    the ids must be plain greedy's."""
    from tests.factory import write_random_gpt2

    prompt = np.random.default_rng(1).integers(0, 50256, 32).tolist()
    greedy = GenerationParams(max_tokens=SPECULATIVE_TOKENS, temperature=0, ignore_eos=True)
    with tempfile.TemporaryDirectory(prefix="gpt2-bench-draft-") as tmp:
        draft = GPT2.from_pretrained(write_random_gpt2(Path(tmp), DRAFT, seed=1))
        ways = {
            "plain greedy": (greedy, None),
            "prompt lookup K=10": (replace(greedy, prompt_lookup=10), None),
            "draft model 2x128, K=5": (replace(greedy, draft_tokens=5), draft),
        }
        runs: dict[str, list[tuple[float, int, Sample]]] = {name: [] for name in ways}
        for _ in range(SPECULATIVE_RUNS):
            for name, (params, drafter) in ways.items():
                runs[name].append(_decode_alone(model, prompt, params, drafter))
    plain_ids = runs["plain greedy"][0][2].ids
    plain_s = statistics.median(t for t, _, _ in runs["plain greedy"])
    rows = []
    for name, results in runs.items():
        seconds = statistics.median(t for t, _, _ in results)
        _, passes, sample = results[0]
        t = sample.timings
        rows.append(
            [
                name,
                passes,
                f"{(len(sample.ids) - 1) / passes:.2f}",
                f"{len(sample.ids) / seconds:.1f}",
                f"{plain_s / seconds:.2f}x",
                "-" if t.drafted is None else f"{t.accepted}/{t.drafted}",
                verdict(sample.ids == plain_ids),
            ]
        )
    print_table(
        f"decoding: speculative, {SPECULATIVE_TOKENS} greedy tokens from a 32-token prompt, "
        f"124M-shaped random weights (median of {SPECULATIVE_RUNS} runs); {load()}",
        ["way", "passes", "tokens/pass", "tok/s", "speed", "accepted/drafted", "same ids"],
        rows,
    )
    pass_cost(model, prompt)


def pass_cost(model: GPT2, prompt: list[int]) -> None:
    """What drafting must win back: one pass of T positions (`step_many`) against one of a
    single token, batch 1, after the prompt; medians of STEPS passes, taken in turn."""
    widths = (1, 2, 6, 11)
    state, _ = model.prefill([prompt], capacity=len(prompt) + max(widths))
    times: dict[int, list[float]] = {t: [] for t in widths}
    for _ in range(STEPS):
        for width, spent in times.items():
            state.lengths[:] = len(prompt)  # each pass rolled back
            start = time.perf_counter()
            model.step_many(state, np.ones((1, width), np.intp))
            spent.append(time.perf_counter() - start)
    one = statistics.median(times[1])
    rows = [
        [t, f"{statistics.median(s) * 1e3:.1f}", f"{statistics.median(s) / one:.2f}x"]
        for t, s in times.items()
    ]
    print_table(
        f"decoding: one pass of T positions (ms, median of {STEPS}) against one token, "
        f"batch 1, 124M-shaped random weights; {load()}",
        ["T", "ms", "cost"],
        rows,
    )


def _decode_alone(
    model: GPT2, prompt: list[int], params: GenerationParams, draft: GPT2 | None
) -> tuple[float, int, Sample]:
    """One request run alone: seconds, decode passes (one per step), its sample."""
    generation = Generation(model, prompt, params, draft=draft)
    scheduler = generation.scheduler
    passes, start = 0, time.perf_counter()
    while scheduler.busy:
        scheduler.step()
        passes += 1
    return time.perf_counter() - start, passes, generation.samples[0]


BEAM_WIDTH = 4
BEAM_TARGET = 1.6  # a beam search's time per generated token at most this many times greedy's


def beam(model: GPT2) -> None:
    """Beam search W = 4 against greedy from one random 32-token prompt: a decode step each
    (one generated token: W rows, the search's choice over W x V scores and the moves of its
    cache rows, against one row's argmax), the two taken in turn, after the prefill."""
    prompt = np.random.default_rng(2).integers(0, 50256, 32).tolist()
    greedy = GenerationParams(max_tokens=STEPS + 1, temperature=0, ignore_eos=True)
    schedulers = []
    for params in (greedy, replace(greedy, num_beams=BEAM_WIDTH)):
        scheduler = Scheduler(model, params.draws, len(prompt) + STEPS + 1)
        scheduler.submit(Request(prompt, params))
        scheduler.step()  # the prefill and first token: not a decode step
        schedulers.append(scheduler)
    plain, searched = interleaved_steps(schedulers)
    ratio = searched / plain
    print_table(
        f"decoding: beam search against greedy, ms per generated token (median of {STEPS} "
        f"decode steps), a 32-token prompt, 124M-shaped random weights; {load()}",
        ["greedy", f"beam W={BEAM_WIDTH}", "ratio", "target", ""],
        [
            [
                plain * 1e3,
                searched * 1e3,
                f"{ratio:.3f}x",
                f"<= {BEAM_TARGET:g}x",
                verdict(ratio <= BEAM_TARGET),
            ]
        ],
    )


# each measure prints its own table from the one loaded model
MEASURES: list[Callable[[GPT2], None]] = [processors, speculative, beam]


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="gpt2-bench-decoding-") as tmp:
        model = GPT2.from_pretrained(random_124m(Path(tmp) / "gpt2-124M"))
        for measure in MEASURES:
            measure(model)


if __name__ == "__main__":
    main()
