"""Real labelled pairs for the fine-tuning demo and tests, cut from Shakespeare's plays (the sample corpus, so a
fresh clone has them): each speech with its play, and runs of speeches as dialogues.

    speeches(path) -> [(speaker, speech)] of one play, in order
    write_pairs(folder, plays, per_play) -> folder holding
        classify.jsonl   {"prompt": "Which play is this from? <speech>", "completion": "<play>"}   (a class)
        dialogue.jsonl   {"messages": [system, user: a speech, assistant: the next speech, user: ..., ...]}
"""

import json
import re
import shutil
from pathlib import Path

from data_pipeline.sample_corpus import sample_corpus_dir

SPEAKER = re.compile(r"^([A-Z][A-Za-z]+\.?(?: [A-Z][A-Za-z]+\.?)?)\.$")  # "Hor." / "Lady M." on a line alone
PLAYS = ("hamlet", "macbeth", "othello")


def speeches(path: Path) -> list[tuple[str, str]]:
    out, speaker, lines = [], None, []
    text = path.read_text(encoding="utf-8")
    text = text[text.find("\nACT I.") + 1:]  # past the cast list, whose lines look like speakers too
    for line in text.splitlines() + [""]:
        found = SPEAKER.match(line.strip())
        if found:
            speaker, lines = found.group(1), []
        elif line.strip() and speaker:
            lines.append(line.strip())
        elif speaker and lines:
            out.append((speaker.rstrip("."), " ".join(lines)))
            speaker, lines = None, []
    return out


def pairs(plays=PLAYS, per_play: int = 200, max_chars: int = 240) -> tuple[list[dict], list[dict]]:
    """(classify, dialogue) records of the plays: each speech of at most max_chars with its play, and runs of four
    speeches as a dialogue (user, assistant, user, assistant) after a system turn."""
    classify, dialogue = [], []
    for play in plays:
        said = [(who, text) for who, text in speeches(sample_corpus_dir() / f"{play}.txt") if len(text) <= max_chars]
        for who, text in said[:per_play]:
            classify.append({"prompt": f"Which play is this from? {text}", "completion": play.title()})
        for i in range(0, min(len(said), per_play) - 3, 4):
            turns = [{"role": "system", "content": f"You speak as the characters of {play.title()}."}]
            for k, (who, text) in enumerate(said[i:i + 4]):
                turns.append({"role": "user" if k % 2 == 0 else "assistant", "content": f"{who}: {text}"})
            dialogue.append({"messages": turns})
    return classify, dialogue


def _write_jsonl(path: Path, records: list[dict]):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def write_pairs(folder: Path, plays=PLAYS, per_play: int = 200, max_chars: int = 240) -> Path:
    """folder/classify.jsonl and folder/dialogue.jsonl (made if missing)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, records in zip(("classify.jsonl", "dialogue.jsonl"), pairs(plays, per_play, max_chars)):
        _write_jsonl(folder / name, records)
    return folder


def write_split_pairs(folder: Path, held_every: int = 10, per_play: int = 100_000) -> Path:
    """folder/train/ and folder/held/ (every held_every-th record: pairs never trained on), written whole or not
    at all."""
    if (folder / "held" / "dialogue.jsonl").is_file():
        return folder
    tmp = folder.parent / f".{folder.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    for name, records in zip(("classify.jsonl", "dialogue.jsonl"), pairs(per_play=per_play)):
        for split, keep in (("train", lambda i: i % held_every), ("held", lambda i: not i % held_every)):
            (tmp / split).mkdir(parents=True, exist_ok=True)
            _write_jsonl(tmp / split / name, [r for i, r in enumerate(records) if keep(i)])
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder
