"""Task loaders: exact lm-eval prompts on handwritten records, the real dev files, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from infmoe.errors import ConfigError, DataError
from infmoe.evaluation.tasks import TASKS, Request, load_task

EVAL_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "eval"


def write_jsonl(folder: Path, records: list, name: str = "data.jsonl") -> Path:
    path = folder / name
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8"
    )
    return path


def load_one(tmp_path: Path, task: str, record: dict) -> Request:
    (request,) = load_task(task, write_jsonl(tmp_path, [record]))
    return request


# --- exact prompts, as lm-eval 0.4.x renders them ---------------------------------------------

ARC_RECORD = {
    "id": "x1",
    "question": {
        "stem": "Which is a gas?",
        "choices": [
            {"text": "ice", "label": "A"},
            {"text": "steam", "label": "B"},
            {"text": "rock", "label": "C"},
        ],
    },
    "answerKey": "B",
}

EXPECTED = {
    "hellaswag": (
        {
            "ind": 7,
            "activity_label": "Making a cake",
            "ctx": "[header] How to bake [title] Mix  the flour. then",
            "endings": ["she [step] stirs.", " bakes it. "],
            "label": "1",
        },
        ["Making a cake: How to bake. Mix the flour. then"] * 2,
        [" she stirs.", " bakes it."],
        1,
        (10, 9),
    ),
    "piqa": (
        {"goal": "Open a jar", "sol1": "twist the lid", "sol2": "hit it", "label": 0},
        ["Question: Open a jar\nAnswer:"] * 2,
        [" twist the lid", " hit it"],
        0,
        (13, 6),
    ),
    "arc_easy": (
        ARC_RECORD,
        ["Question: Which is a gas?\nAnswer:"] * 3,
        [" ice", " steam", " rock"],
        1,
        (3, 5, 4),
    ),
    "arc_challenge": (
        ARC_RECORD,
        ["Question: Which is a gas?\nAnswer:"] * 3,
        [" ice", " steam", " rock"],
        1,
        (3, 5, 4),
    ),
    "winogrande": (
        {
            "qID": "q",
            "sentence": "Ann lent Bo a pen because _ had two.",
            "option1": "Ann",
            "option2": "Bo",
            "answer": "1",
        },
        ["Ann lent Bo a pen because Ann", "Ann lent Bo a pen because Bo"],
        [" had two."] * 2,
        0,
        None,
    ),
    "boolq": (
        {"question": "is water wet", "title": "Water", "answer": True, "passage": "Water is a liquid."},
        ["Water is a liquid.\nQuestion: is water wet?\nAnswer:"] * 2,
        [" no", " yes"],
        1,
        None,
    ),
    "openbookqa": (
        {
            "id": "7",
            "question": {
                "stem": "The sun is a",
                "choices": [{"text": "star", "label": "A"}, {"text": "planet", "label": "B"}],
            },
            "answerKey": " A",
        },
        ["The sun is a"] * 2,
        [" star", " planet"],
        0,
        (4, 6),
    ),
    "sciq": (
        {
            "question": "What do plants make?",
            "distractor1": "salt",
            "distractor2": "iron",
            "distractor3": "gold",
            "correct_answer": "sugar",
            "support": "  Plants photosynthesise.",
        },
        ["Plants photosynthesise.\nQuestion: What do plants make?\nAnswer:"] * 4,
        [" salt", " iron", " gold", " sugar"],
        3,
        (4, 4, 4, 5),
    ),
    "lambada": (
        {"text": 'He opened the door.\n\n"Come in," said Tom'},
        ['He opened the door.\n\n"Come in," said'],
        [" Tom"],
        0,
        None,
    ),
}


@pytest.mark.parametrize("task", list(EXPECTED))
def test_prompts_match_lm_eval(tmp_path, task):
    record, contexts, continuations, gold, norm_lengths = EXPECTED[task]
    request = load_one(tmp_path, task, record)
    assert request.contexts == tuple(contexts)
    assert request.continuations == tuple(continuations)
    assert request.gold == gold
    assert request.norm_lengths == norm_lengths
    assert request.greedy == (task == "lambada")


def test_every_task_has_an_expected_prompt():
    assert set(EXPECTED) == set(TASKS)


def test_hellaswag_uses_ctx_a_and_capitalised_ctx_b_when_present(tmp_path):
    record = {
        "activity_label": "Roof",
        "ctx_a": "A man is on a roof.",
        "ctx_b": "he",
        "ctx": "ignored",
        "endings": ["falls."],
        "label": 0,
    }
    assert load_one(tmp_path, "hellaswag", record).contexts == ("Roof: A man is on a roof. He",)


def test_sciq_with_empty_support_starts_with_newline(tmp_path):
    record = dict(EXPECTED["sciq"][0], support="")
    assert load_one(tmp_path, "sciq", record).contexts[0] == "\nQuestion: What do plants make?\nAnswer:"


# --- the real dev files -----------------------------------------------------------------------

SIZES = {
    "hellaswag": (200, 4),
    "piqa": (200, 2),
    "arc_easy": (100, None),
    "arc_challenge": (100, None),
    "winogrande": (200, 2),
    "boolq": (200, 2),
    "openbookqa": (100, 4),
    "sciq": (100, 4),
    "lambada": (200, 1),
}

FIRST_CONTEXT = {
    "hellaswag": "Roof shingle removal: A man is sitting on a roof. he",
    "piqa": "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:",
    "arc_easy": "Question: Which technology was developed most recently?\nAnswer:",
    "winogrande": "Sarah was a much better surgeon than Maria so Sarah",
    "sciq": "\nQuestion: Who proposed the theory of evolution by natural selection?\nAnswer:",
}


@pytest.fixture(scope="module")
def eval_data() -> Path:
    if not EVAL_DATA.is_dir():
        pytest.skip(f"the shared evaluation data {EVAL_DATA} is absent (it lives beside the repository)")
    return EVAL_DATA


@pytest.mark.parametrize("task", list(TASKS))
def test_real_dev_file_loads(eval_data, task):
    requests = load_task(task, eval_data / task / "dev.jsonl")
    n_items, n_choices = SIZES[task]
    assert len(requests) == n_items
    for request in requests:
        if n_choices is None:  # ARC: 3 to 5 choices
            assert 3 <= len(request.pairs) <= 5
        else:
            assert len(request.pairs) == n_choices
        assert all(c.startswith(" ") and len(c) > 1 for c in request.continuations)
        assert all(request.contexts)
    if task in FIRST_CONTEXT:
        assert requests[0].contexts[0] == FIRST_CONTEXT[task]


def test_real_dev_file_limit(eval_data):
    assert len(load_task("piqa", eval_data / "piqa" / "dev.jsonl", limit=5)) == 5


# --- bad input: one line naming the file, the line and the field ------------------------------


def test_unknown_task_lists_the_known_ones(tmp_path):
    with pytest.raises(DataError, match="unknown task 'mmlu': choose one of hellaswag, piqa, arc_easy"):
        load_task("mmlu", tmp_path / "x.jsonl")


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_task("piqa", tmp_path / "absent.jsonl")


def test_empty_file(tmp_path):
    with pytest.raises(DataError, match="no records"):
        load_task("piqa", write_jsonl(tmp_path, ["", "  "]))


GOOD_PIQA = {"goal": "g", "sol1": "a", "sol2": "b", "label": 1}


@pytest.mark.parametrize(
    "task, bad, message",
    [
        ("piqa", "{not json", r":3: not a JSON object \(.*\); a piqa record is \{goal, sol1, sol2, label\}"),
        ("piqa", "[1, 2]", r":3: bad piqa record: not a JSON object"),
        (
            "piqa",
            {"goal": "g", "sol1": "a", "label": 0},
            r":3: bad piqa record: field 'sol2' is missing; expected",
        ),
        ("piqa", dict(GOOD_PIQA, label=2), r":3: .*field 'label' must be an integer in \[0, 2\), not 2"),
        ("piqa", dict(GOOD_PIQA, goal=5), r":3: .*field 'goal' must be a string, not 5"),
        (
            "boolq",
            {"question": "q", "passage": "p", "answer": "yes"},
            r"field 'answer' must be true or false",
        ),
        ("arc_easy", dict(ARC_RECORD, answerKey="E"), r"field 'answerKey' is 'E', not one of the labels"),
        (
            "arc_easy",
            {"question": {"stem": "s", "choices": [{"text": "t"}]}, "answerKey": "A"},
            r"field 'question.choices.0.label' is missing",
        ),
        (
            "hellaswag",
            {"activity_label": "a", "ctx": "c", "endings": ["x", 3], "label": 0},
            r"field 'endings.1' must be a string",
        ),
        (
            "winogrande",
            {"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"},
            r"has no blank",
        ),
        (
            "winogrande",
            {"sentence": "a _ b", "option1": "a", "option2": "b", "answer": ""},
            r"unlabelled test split",
        ),
        ("lambada", {"text": "oneword"}, r"field 'text' must be a passage ending in a word"),
    ],
)
def test_bad_record_names_line_and_field(tmp_path, task, bad, message):
    good = load_task(
        task, write_jsonl(tmp_path, [EXPECTED[task][0]], "good.jsonl")
    )  # the good record is good
    assert len(good) == 1
    path = write_jsonl(tmp_path, [EXPECTED[task][0], "", bad])
    with pytest.raises(DataError, match=message) as info:
        load_task(task, path)
    assert str(info.value).startswith(f"{path}:3: ") and "\n" not in str(info.value)


def test_bad_record_after_limit_is_not_read(tmp_path):
    path = write_jsonl(tmp_path, [GOOD_PIQA, "{not json"])
    assert len(load_task("piqa", path, limit=1)) == 1


def test_bad_limit(tmp_path):
    with pytest.raises(ConfigError, match="limit=0 is invalid"):
        load_task("piqa", write_jsonl(tmp_path, [GOOD_PIQA]), limit=0)


def test_non_utf8_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(GOOD_PIQA).encode() + b"\n" + '{"goal": "caf\xe9"}'.encode("latin-1") + b"\n")
    with pytest.raises(DataError, match=r":2: not UTF-8 text"):
        load_task("piqa", path)


def test_request_checks_its_shape():
    with pytest.raises(ValueError):
        Request(contexts=("a",), continuations=(" b", " c"), gold=0)
    with pytest.raises(ValueError):
        Request(contexts=("a",), continuations=(" b",), gold=1)
