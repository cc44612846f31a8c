"""Zero-shot tasks: one original jsonl record → one `Request`, formatted as lm-evaluation-harness does.

Each builder below reproduces one lm-evaluation-harness (v0.4.x, checked against 0.4.13) task
at 0 shots: its ``doc_to_text`` is the context, each ``doc_to_choice`` entry preceded by the
task's ``target_delimiter`` (" ") is a continuation, ``doc_to_target`` the gold index. The
records are the datasets' *original* layouts (see ../shared/data/README.md), which differ in
places from the Hugging Face copies lm-eval reads (ARC's nested ``question.stem``, BoolQ's
boolean ``answer``); each builder names the field it maps.

`load_task` reads a file and reports the first bad record as one line naming the file, the
line and the field, raised as `DataError`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infmoe.errors import DataError, positive_int

DELIMITER = " "  # lm-eval's default target_delimiter, put before every continuation


@dataclass(frozen=True)
class Request:
    """One test item as (context, continuation) pairs, pair i scoring choice i.

    contexts, continuations: tuples of equal length n_choices. Most tasks repeat one context;
        WinoGrande puts the choice in the context ("partial scoring") and repeats the
        continuation.
    gold: index of the correct pair.
    norm_lengths: characters of each choice, dividing its log-likelihood for acc_norm (lm-eval
        counts the choice text without the leading delimiter); None when lm-eval reports no
        acc_norm for the task.
    greedy: a single-pair item (LAMBADA) that is correct when its continuation is exactly the
        model's greedy continuation, rather than the most likely of several choices.
    """

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int
    norm_lengths: tuple[int, ...] | None = None
    greedy: bool = False

    def __post_init__(self) -> None:
        n = len(self.contexts)
        sizes = {n, len(self.continuations), n if self.norm_lengths is None else len(self.norm_lengths)}
        if n == 0 or len(sizes) > 1:
            raise ValueError(
                "a Request needs contexts, continuations (and norm_lengths) for each of >= 1 choices"
            )
        if not 0 <= self.gold < n or (self.greedy and n != 1):
            raise ValueError(
                f"gold={self.gold} does not index {n} choice(s) (a greedy request has exactly one)"
            )

    @classmethod
    def choice(cls, context: str, choices: list[str], gold: int, *, normalise: bool = True) -> Request:
        """A context followed by one of `choices` (each after the delimiter " ")."""
        return cls(
            contexts=(context,) * len(choices),
            continuations=tuple(DELIMITER + c for c in choices),
            gold=gold,
            norm_lengths=tuple(len(c) for c in choices) if normalise else None,
        )

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return list(zip(self.contexts, self.continuations))


class RecordError(Exception):
    """A record that does not fit its task's layout; `load_task` adds the file and line."""


_KINDS = {str: "a string", int: "an integer", bool: "true or false", list: "a list", dict: "an object"}


def lookup(record: Any, path: str) -> Any:
    """``record[a][b]...`` for `path` "a.b..." (a number indexes a list); a `RecordError`
    naming the path if absent."""
    value = record
    for key in path.split("."):
        if isinstance(value, list) and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        elif isinstance(value, dict) and key in value:
            value = value[key]
        else:
            raise RecordError(f"field {path!r} is missing")
    return value


def field(record: Any, path: str, kind: type) -> Any:
    """`lookup` checked to be of type `kind` (a bool is not an int here)."""
    value = lookup(record, path)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RecordError(f"field {path!r} must be {_KINDS[kind]}, not {json.dumps(value)[:40]}")
    return value


def strings(record: Any, path: str) -> list[str]:
    """A non-empty list-of-strings field."""
    values = field(record, path, list)
    if not values:
        raise RecordError(f"field {path!r} is empty")
    return [field(record, f"{path}.{i}", str) for i in range(len(values))]


def index(record: Any, path: str, n: int) -> int:
    """An integer field in [0, n), also accepted as a string of digits (Hugging Face copies)."""
    value = lookup(record, path)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n:
        raise RecordError(f"field {path!r} must be an integer in [0, {n}), not {json.dumps(value)[:40]}")
    return value


def lettered_choices(record: Any) -> tuple[str, list[str], int]:
    """(stem, choice texts, gold) of an ARC/OpenBookQA record:
    {question: {stem, choices: [{text, label}, ...]}, answerKey}."""
    stem = field(record, "question.stem", str)
    n = len(field(record, "question.choices", list))
    if n == 0:
        raise RecordError("field 'question.choices' is empty")
    texts = [field(record, f"question.choices.{i}.text", str) for i in range(n)]
    labels = [field(record, f"question.choices.{i}.label", str) for i in range(n)]
    # lm-eval: choices.label.index(answerKey), after answerKey.lstrip() for OpenBookQA
    key = field(record, "answerKey", str).lstrip()
    if key not in labels:
        raise RecordError(f"field 'answerKey' is {key!r}, not one of the labels {labels}")
    return stem, texts, labels.index(key)


# --- the tasks: one function per lm-eval task -------------------------------------------------


def _hellaswag_clean(text: str) -> str:
    """lm-eval hellaswag/utils.py `preprocess`: drop WikiHow's bracketed artefacts."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag(record: dict) -> Request:
    """lm-eval ``hellaswag`` (tasks/hellaswag/utils.py): context
    preprocess(activity_label + ": " + ctx), choices preprocess(ending). lm-eval builds ctx
    as ctx_a + " " + ctx_b.capitalize(); our export has only the joined ``ctx`` (its ctx_b
    not capitalised), so ctx_a/ctx_b are used when a record has them, else ``ctx``."""
    if "ctx_a" in record and "ctx_b" in record:
        ctx = field(record, "ctx_a", str) + " " + field(record, "ctx_b", str).capitalize()
    else:
        ctx = field(record, "ctx", str)
    label = field(record, "activity_label", str)
    endings = strings(record, "endings")
    return Request.choice(
        _hellaswag_clean(label + ": " + ctx),
        [_hellaswag_clean(e) for e in endings],
        index(record, "label", len(endings)),
    )


def piqa(record: dict) -> Request:
    """lm-eval ``piqa`` (tasks/piqa/piqa.yaml): "Question: {goal}\\nAnswer:", choices sol1, sol2."""
    goal, sol1, sol2 = (field(record, k, str) for k in ("goal", "sol1", "sol2"))
    return Request.choice(f"Question: {goal}\nAnswer:", [sol1, sol2], index(record, "label", 2))


def arc(record: dict) -> Request:
    """lm-eval ``arc_easy`` / ``arc_challenge`` (tasks/arc/arc_easy.yaml):
    "Question: {question}\\nAnswer:" (our ``question.stem``), choices the choice texts."""
    stem, texts, gold = lettered_choices(record)
    return Request.choice(f"Question: {stem}\nAnswer:", texts, gold)


def winogrande(record: dict) -> Request:
    """lm-eval ``winogrande`` (tasks/winogrande/preprocess_winogrande.py), partial scoring:
    context i = sentence up to the blank "_" with option i in it, the one continuation
    " " + the rest of the sentence after the blank, stripped. acc only."""
    sentence = field(record, "sentence", str)
    if "_" not in sentence:
        raise RecordError("field 'sentence' has no blank '_'")
    options = [field(record, "option1", str), field(record, "option2", str)]
    answer = field(record, "answer", str)
    if answer not in ("1", "2"):
        raise RecordError(
            f'field \'answer\' must be "1" or "2", not {json.dumps(answer)} (an unlabelled test split?)'
        )
    blank = sentence.index("_")
    rest = sentence[blank + 1 :].strip()
    return Request(
        contexts=tuple(sentence[:blank] + option for option in options),
        continuations=(DELIMITER + rest,) * 2,
        gold=int(answer) - 1,
    )


def boolq(record: dict) -> Request:
    """lm-eval ``boolq`` (tasks/super_glue/boolq/default.yaml):
    "{passage}\\nQuestion: {question}?\\nAnswer:", choices "no", "yes" (gold = our boolean
    ``answer``, lm-eval's ``label``). acc only."""
    passage, question = field(record, "passage", str), field(record, "question", str)
    gold = int(field(record, "answer", bool))
    return Request.choice(f"{passage}\nQuestion: {question}?\nAnswer:", ["no", "yes"], gold, normalise=False)


def openbookqa(record: dict) -> Request:
    """lm-eval ``openbookqa`` (tasks/openbookqa/openbookqa.yaml): the bare question_stem
    (our ``question.stem``), choices the choice texts."""
    stem, texts, gold = lettered_choices(record)
    return Request.choice(stem, texts, gold)


def sciq(record: dict) -> Request:
    """lm-eval ``sciq`` (tasks/sciq/sciq.yaml): "{support.lstrip()}\\nQuestion: {question}\\nAnswer:",
    choices distractor1, distractor2, distractor3, correct_answer (gold 3)."""
    support, question = field(record, "support", str), field(record, "question", str)
    names = ("distractor1", "distractor2", "distractor3", "correct_answer")
    choices = [field(record, k, str) for k in names]
    return Request.choice(f"{support.lstrip()}\nQuestion: {question}\nAnswer:", choices, 3)


def lambada(record: dict) -> Request:
    """lm-eval ``lambada_openai`` (tasks/lambada/lambada_openai.yaml): context = text up to
    its last " ", continuation " " + the last word; correct when that word is the greedy
    continuation. acc only."""
    text = field(record, "text", str)
    words = text.split(" ")
    if len(words) < 2 or not words[-1]:
        raise RecordError("field 'text' must be a passage ending in a word after a space")
    return Request(
        contexts=(" ".join(words[:-1]),), continuations=(DELIMITER + words[-1],), gold=0, greedy=True
    )


@dataclass(frozen=True)
class Task:
    """A task: its lm-eval counterpart, its record layout (for messages) and builder."""

    lm_eval: str
    layout: str
    build: Callable[[dict], Request]


_LETTERED = "{id, question: {stem, choices: [{text, label}]}, answerKey}"
TASKS: dict[str, Task] = {
    "hellaswag": Task("hellaswag", "{ind, activity_label, ctx, endings, label}", hellaswag),
    "piqa": Task("piqa", "{goal, sol1, sol2, label}", piqa),
    "arc_easy": Task("arc_easy", _LETTERED, arc),
    "arc_challenge": Task("arc_challenge", _LETTERED, arc),
    "winogrande": Task(
        "winogrande", '{qID, sentence with "_", option1, option2, answer "1"/"2"}', winogrande
    ),
    "boolq": Task("boolq", "{question, title, answer: bool, passage}", boolq),
    "openbookqa": Task("openbookqa", _LETTERED, openbookqa),
    "sciq": Task("sciq", "{question, distractor1-3, correct_answer, support}", sciq),
    "lambada": Task("lambada_openai", "{text}", lambada),
}


def get_task(name: str) -> Task:
    """The task called `name`, or a `DataError` listing the known ones."""
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}: choose one of {', '.join(TASKS)}")
    return TASKS[name]


def load_task(name: str, path: str | Path, limit: int | None = None) -> list[Request]:
    """The requests of the first `limit` (all when None) records of jsonl file `path`,
    one JSON object per line in task `name`'s original layout; blank lines are skipped."""
    task = get_task(name)
    if limit is not None:
        positive_int("limit", limit)
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; give the {name} jsonl file (one record per line)")
    requests: list[Request] = []
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            if limit is not None and len(requests) == limit:
                break
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{where}: not UTF-8 text; save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{where}: not a JSON object ({err.msg}); a {name} record is {task.layout}"
                ) from None
            try:
                if not isinstance(record, dict):
                    raise RecordError("not a JSON object")
                requests.append(task.build(record))
            except RecordError as err:
                raise DataError(f"{where}: bad {name} record: {err}; expected {task.layout}") from None
    if not requests:
        raise DataError(f"{path}: no records; give a jsonl file with one {name} record per line")
    return requests
