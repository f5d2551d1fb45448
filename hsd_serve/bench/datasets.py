"""Benchmark prompts: raw (chat-free) prompts from the datasets in ``shared/assets/datasets``.

* ``humaneval``: the ``prompt`` field (a signature and docstring to complete).
* ``mbpp``: the task ``text`` and its first test, as a docstring that opens a code file.
* ``cnndm`` / ``xsum``: ``"Summarize: <article>\\n\\nSummary:"`` with the article cut to
  ``SUMMARY_ARTICLE_CHARS`` characters (at a word boundary).
* ``qmsum``: the whole meeting transcript then the first general query; the transcript is cut
  further (see :func:`fit_prompts`) so the prompt fits the target's (and drafter's) context.
* ``specbench``: the first turn of each Spec-Bench question.

A :class:`Prompt` keeps its text in three parts so that only the ``body`` is ever truncated.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

DATASETS: tuple[str, ...] = ("humaneval", "mbpp", "cnndm", "xsum", "qmsum", "specbench")

FILES: dict[str, str] = {
    "humaneval": "HumanEval.jsonl.gz",
    "mbpp": "mbpp.jsonl",
    "cnndm": "cnn_dailymail_test_sample.jsonl",
    "xsum": "xsum_test_sample.jsonl",
    "qmsum": "qmsum_test.jsonl",
    "specbench": "spec_bench_question.jsonl",
}

SUMMARY_ARTICLE_CHARS = 1500
LONG_CONTEXT = ("qmsum",)


@dataclass(frozen=True)
class Prompt:
    dataset: str
    id: str
    prefix: str
    body: str
    suffix: str = ""
    truncated: bool = False
    meta: dict = field(default_factory=dict, compare=False)

    @property
    def text(self) -> str:
        return self.prefix + self.body + self.suffix


def default_data_dirs() -> list[Path]:
    """Candidate dataset folders, in the order they are tried."""
    repo = Path(__file__).resolve().parents[2]
    out = []
    env = os.environ.get("HSD_BENCH_DATA")
    if env:
        out.append(Path(env))
    out += [Path.cwd().parent / "shared" / "assets" / "datasets",
            repo.parent / "shared" / "assets" / "datasets",
            Path("/work/shared/assets/datasets")]
    return out


def find_data_dir(explicit: Optional[str | os.PathLike] = None) -> Path:
    """The dataset folder: ``explicit`` when given, else the first default that exists."""
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"dataset folder not found: {path}")
        return path
    for path in default_data_dirs():
        if path.is_dir():
            return path
    raise FileNotFoundError("no dataset folder found (tried "
                            + ", ".join(str(p) for p in default_data_dirs())
                            + "); pass --data-dir")


def available_datasets(data_dir: Optional[str | os.PathLike] = None) -> list[str]:
    try:
        root = find_data_dir(data_dir)
    except FileNotFoundError:
        return []
    return [name for name in DATASETS if (root / FILES[name]).is_file()]


def _jsonl(path: Path) -> Iterable[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                yield json.loads(line)


def _cut_words(text: str, n: int) -> str:
    """At most ``n`` characters of ``text``, ending at a word boundary when one is close."""
    if len(text) <= n:
        return text
    cut = text[:n]
    space = cut.rfind(" ")
    return cut[:space] if space > n * 0.8 else cut


def _humaneval(rows):
    for r in rows:
        yield Prompt("humaneval", r["task_id"], "", r["prompt"])


def _mbpp(rows):
    for r in rows:
        tests = r.get("test_list") or []
        test = tests[0] if tests else ""
        doc = f'"""\n{r["text"].strip()}\n{test.strip()}\n"""\n'
        yield Prompt("mbpp", str(r["task_id"]), "", doc)


def _summary(name, key):
    def gen(rows):
        for r in rows:
            article = " ".join(r[key].split())
            yield Prompt(name, str(r["id"]), "Summarize: ",
                         _cut_words(article, SUMMARY_ARTICLE_CHARS), "\n\nSummary:",
                         truncated=len(article) > SUMMARY_ARTICLE_CHARS)
    return gen


def _qmsum(rows):
    for i, r in enumerate(rows):
        turns = "\n".join(f"{t['speaker']}: {' '.join(t['content'].split())}"
                          for t in r["meeting_transcripts"])
        queries = r.get("general_query_list") or r.get("specific_query_list") or []
        query = queries[0]["query"] if queries else "Summarize the whole meeting."
        yield Prompt("qmsum", f"qmsum-{i}", "Meeting transcript:\n", turns,
                     f"\n\nQuery: {query}\nAnswer:")


def _specbench(rows):
    for r in rows:
        yield Prompt("specbench", f"{r.get('category', '')}-{r['question_id']}", "",
                     r["turns"][0], meta={"category": r.get("category")})


_PARSERS: dict[str, Callable] = {
    "humaneval": _humaneval,
    "mbpp": _mbpp,
    "cnndm": _summary("cnndm", "article"),
    "xsum": _summary("xsum", "document"),
    "qmsum": _qmsum,
    "specbench": _specbench,
}


def load_prompts(name: str, data_dir: Optional[str | os.PathLike] = None,
                 limit: Optional[int] = None) -> list[Prompt]:
    """The first ``limit`` prompts of dataset ``name`` (all when ``limit`` is None)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    path = find_data_dir(data_dir) / FILES[name]
    if not path.is_file():
        raise FileNotFoundError(f"dataset {name!r} not found at {path}")
    out: list[Prompt] = []
    for p in _PARSERS[name](_jsonl(path)):
        if not p.text.strip():
            continue
        out.append(p)
        if limit is not None and len(out) >= limit:
            break
    return out


def truncate_to_fit(prompt: Prompt, fits: Callable[[str], bool]) -> Optional[Prompt]:
    """The longest cut of ``prompt.body`` (at a line/word boundary) whose text ``fits``;
    ``None`` when even an empty body does not fit."""
    if fits(prompt.text):
        return prompt
    if not fits(prompt.prefix + prompt.suffix):
        return None
    lo, hi = 0, len(prompt.body)  # fits(lo) holds, fits(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(prompt.prefix + prompt.body[:mid] + prompt.suffix):
            lo = mid
        else:
            hi = mid
    body = prompt.body[:lo]
    for sep in ("\n", " "):  # end on a boundary when it costs under 20% of the kept text
        j = body.rfind(sep)
        if j > 0.8 * len(body):
            body = body[:j]
            break
    return replace(prompt, body=body, truncated=True,
                   meta={**prompt.meta, "original_chars": len(prompt.text)})


def context_fitter(target_tokenizer, target_context: int, max_new_tokens: int, *,
                   drafter_tokenizer=None, drafter_context: Optional[int] = None,
                   lookahead: int = 8, margin: int = 8) -> Callable[[str], bool]:
    """``fits(text)``: the prompt leaves room for ``max_new_tokens`` (and a round of drafts) in
    the target's context, and in the drafter's scaled by its tokens-per-target-token ratio."""

    def fits(text: str) -> bool:
        n_t = len(target_tokenizer.encode_prompt(text))
        if n_t + max_new_tokens + lookahead + margin > target_context:
            return False
        if drafter_tokenizer is not None and drafter_context:
            n_d = len(drafter_tokenizer.encode_prompt(text))
            ratio = max(1.0, n_d / max(1, n_t))
            if n_d + ratio * (max_new_tokens + lookahead) * 1.5 + margin > drafter_context:
                return False
        return True

    return fits


def fit_prompts(prompts: Sequence[Prompt], fits: Callable[[str], bool]) -> tuple[list[Prompt], int]:
    """(prompts cut to fit, number dropped because nothing fits)."""
    out, dropped = [], 0
    for p in prompts:
        q = truncate_to_fit(p, fits)
        if q is None:
            dropped += 1
        else:
            out.append(q)
    return out, dropped
