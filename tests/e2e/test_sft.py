"""Supervised fine-tuning (data.format=chat) through the real commands: `python -m data_pipeline build ...
format=chat` on real conversations (data_pipeline/sample_pairs.py: Shakespeare speeches -> their play, and dialogues
with system/user/assistant turns), then llm-pretrain's entry point from a text run's checkpoint (init_from).

One set and one reference run serve every check: the held-out answer loss falls, a mid-epoch resume repeats the
run bit for bit with each window seen once an epoch, 2-rank FSDP and TP runs equal it, and bad inputs (runs and
builds) fail in one line with nothing half-written."""

import json
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, TINY, env, ledger, losses, pretrain, tiny_data, without_torchrun_summary

from data_pipeline.chat_build import build_chat_shards
from data_pipeline.loader import TokenLoader
from data_pipeline.shardset import ShardSet
from data_pipeline.tokenizer import Tokenizer

# The tests' own template for the tiny SentencePiece tokenizer, whose </s> is one control piece.
TEMPLATE = ("{% for m in messages %}{% if loop.first %}{{ bos_token }}{% endif %}<|{{ m['role'] }}|>\n"
            "{{ m['content'] }}{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
SEQ_LEN, B, EPOCHS = 256, 8, 3
SFT = [*TINY, "data.format=chat", "data.document_masking=true", f"data.seq_len={SEQ_LEN}", f"epochs={EPOCHS}",
       f"global_batch_size={B}", "val_interval=1", "checkpoint.save_final=true", "checkpoint.keep_last=5"]


def data_pipeline(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_pipeline", *map(str, args)], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=300, **kwargs)


def one_error(proc, *names: str) -> str:
    """The process failed with one `error...` line (no traceback) naming each of names; returns that line."""
    err = without_torchrun_summary(proc.stderr)
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert proc.returncode != 0 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert all(name in lines[0] for name in names), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def chat(tmp_path_factory) -> dict:
    """The tiny tokenizer, its text shards, the template file, and a chat set of 150 real conversations (20% val)
    built by the real command; windows: how many training windows the set packs into at SEQ_LEN."""
    from data_pipeline.sample_pairs import write_pairs

    text = tiny_data(tmp_path_factory)
    root = tmp_path_factory.mktemp("sft")
    template = root / "chat.jinja"
    template.write_text(TEMPLATE)
    pairs = write_pairs(root / "pairs", per_play=40, max_chars=160)
    inputs = [pairs / "classify.jsonl", pairs / "dialogue.jsonl"]
    tokenizer = Path(text[1].split("=", 1)[1])
    proc = data_pipeline("build", f"inputs=[{','.join(map(str, inputs))}]", f"out_dir={root / 'chat'}",
                         f"tokenizer={tokenizer}", "format=chat", f"template={template}", "val_fraction=0.2",
                         "num_proc=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    train = ShardSet.open(root / "chat", split="train")
    windows = train.packing(SEQ_LEN).n
    return {"text": text, "root": root, "template": template, "inputs": inputs, "tokenizer": tokenizer,
            "shards": root / "chat", "windows": windows,
            "overrides": ["data.demo=false", f"data.tokenizer={tokenizer}", f"data.shards=[{root / 'chat'}]"]}


def midway(chat: dict) -> tuple[int, int]:
    """(the run's steps, a checkpoint step in the middle of an epoch) for EPOCHS passes at global batch B."""
    steps = EPOCHS * chat["windows"] // B
    middle = steps // 2
    while middle * B % chat["windows"] == 0:  # on an epoch boundary: move off it
        middle += 1
    return steps, middle


@pytest.fixture(scope="module")
def pretrained(chat) -> Path:
    """A short text pretraining run on the same tokenizer, whose last checkpoint the fine-tuning runs start from."""
    run = chat["root"] / "pretrain"
    pretrain(1, run, *TINY, *chat["text"], "steps=4", f"global_batch_size={B}", "checkpoint.save_final=true",
             torchrun=False)
    return run


def sft_run(chat: dict, pretrained: Path, run: Path, nproc: int, *overrides: str) -> Path:
    _, middle = midway(chat)
    pretrain(nproc, run, *SFT, *chat["overrides"], f"checkpoint.init_from={pretrained}",
             f"checkpoint.interval={middle}", "micro_batch_size=4", *overrides, torchrun=nproc > 1)
    return run


@pytest.fixture(scope="module")
def reference(chat, pretrained) -> Path:
    """One process, 2 accumulated micro-batches a step, validation after every step."""
    return sft_run(chat, pretrained, chat["root"] / "reference", 1)


def val_losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}


def test_fine_tuning_from_a_checkpoint_lowers_the_held_out_answer_loss(chat, pretrained, reference):
    """From the text run's weights, EPOCHS passes (steps = EPOCHS x windows / B, rounded down) lower the loss on the
    val split's answers below its first validation's; the log says how the conversations were packed."""
    steps, _ = midway(chat)
    log = (reference / "logs" / "rank0.log").read_text()
    assert f"initialised weights from {pretrained}" in log
    assert f"epochs={EPOCHS}: {steps} steps of {B} windows" in log
    assert f"packed into {chat['windows']:,} windows of {SEQ_LEN + 1} tokens" in log
    assert sorted(losses(reference)) == list(range(1, steps + 1))
    val = val_losses(reference)
    assert sorted(val) == list(range(1, steps + 1))
    assert val[steps] < val[1] - 0.5, val  # answers the text model never saw: the format and the plays are learnt


def test_resume_mid_epoch_is_bit_exact_and_sees_each_window_once_an_epoch(chat, pretrained, reference, tmp_path):
    """The reference's checkpoint in the middle of an epoch, resumed to the end: the same training and validation
    losses bit for bit; over the whole run every global sample is consumed once, and within each epoch every
    training window once (a complete epoch: all of them)."""
    steps, middle = midway(chat)
    run = tmp_path / "resumed"
    shutil.copytree(reference, run)
    sft_run(chat, pretrained, run, 1, f"checkpoint.resume={middle}")
    assert f"resumed from {run / 'checkpoints' / f'step_{middle:08d}'} at step {middle}" in \
        (run / "logs" / "rank0.log").read_text()
    assert losses(run) == losses(reference)
    assert val_losses(run) == val_losses(reference)

    consumed = ledger(run)
    assert sorted(consumed) == list(range(1, steps + 1))
    samples = [s for step in sorted(consumed) for s in consumed[step]]
    assert samples == list(range(steps * B))
    loader = TokenLoader(ShardSet.open(chat["shards"], split="train"), seq_len=SEQ_LEN, global_batch_size=B)
    _, epoch, window = loader.locate(samples)
    for e in range(int(epoch.max()) + 1):
        seen = window[epoch == e].tolist()
        assert len(seen) == len(set(seen)), f"epoch {e} repeats a window"
        if e < epoch.max():
            assert sorted(seen) == list(range(chat["windows"]))


@pytest.mark.parametrize("layout", [["micro_batch_size=4"], ["parallel.tp=2"], ["parallel.pp=2"]],
                         ids=["fsdp2", "tp2", "pp2"])
def test_two_ranks_equal_one(chat, pretrained, reference, layout, tmp_path):
    """2-rank FSDP (a micro-batch of 4 on each), tp=2 (each rank the whole batch, split heads) and pp=2 (two
    stages, two micro-batches) from the same weights: the one-rank run's training and validation losses
    (test_train.py's and test_tensor_parallel.py's tolerances)."""
    run = sft_run(chat, pretrained, tmp_path / "run", 2, *layout)
    tolerance = {"rel": 1e-5} if "micro_batch_size=4" in layout else {"abs": 1e-5}
    one, two = losses(reference), losses(run)
    assert sorted(one) == sorted(two) and list(two.values()) == pytest.approx(list(one.values()), **tolerance)
    assert list(val_losses(run).values()) == pytest.approx(list(val_losses(reference).values()), **tolerance)


def test_bad_runs_are_refused(chat, reference, tmp_path):
    """A text run on chat shards, a chat run on text shards, a chat run without document masking, and a resume
    with another data.overlong (other windows): one line naming the set or key and the fix, before any step."""
    text_shards = chat["text"][2].split("=", 1)[1].strip("[]")
    _, middle = midway(chat)
    rows = [
        (["data.format=text"], [str(chat["shards"]), "holds conversations", "data.format=chat"]),
        ([f"data.shards=[{text_shards}]"], [text_shards, "holds text, not conversations", "format=chat"]),
        (["data.document_masking=false"], ["data.document_masking", "data.format=chat"]),
        ([f"checkpoint.resume={middle}", "data.overlong=truncate"],
         ["data.overlong=drop", "data.overlong=truncate", "resume with the same data.overlong"]),
    ]
    for k, (change, names) in enumerate(rows):
        run = tmp_path / f"run{k}"
        resumes = any(c.startswith("checkpoint.resume=") for c in change)
        if resumes:
            shutil.copytree(reference, run)
        proc = pretrain(1, run, *SFT, *chat["overrides"], *change, check=False, torchrun=False)
        one_error(proc, *names)
        if resumes:  # nothing trained on
            assert losses(run) == losses(reference)
        else:
            assert not list(run.glob("checkpoints/step_*"))


USER, ANSWER = {"role": "user", "content": "Who?"}, {"role": "assistant", "content": "Hamlet."}
GOOD = {"messages": [{"role": "system", "content": "Be brief."}, USER, ANSWER]}


def records(*rows: dict) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def nothing_built(folder: Path) -> bool:
    """No set and no staging folder: only the build's lock file (which every build leaves) is there."""
    return [p.name for p in folder.iterdir()] in ([], [".set.lock"])


def limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (4000, 4000))  # the shards are larger: their writes fail


def test_bad_builds_name_the_file_and_record_and_leave_nothing(chat, tmp_path):
    """format=chat on records without messages, with an unknown role, an empty or no assistant turn, or that the
    template refuses (raise_exception); a tokenizer with no template and no template=; a build whose writes fail
    (a full disk). Each: one line naming the file and record (or the key), and no out_dir, no staging folder. The
    record rows but the last call the builder in this process (the command costs seconds a row)."""
    refusing = tmp_path / "refusing.jinja"  # the template of a model without a system role
    refusing.write_text("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                        "{% endif %}" + TEMPLATE)
    plain = {"messages": [USER, ANSWER]}
    common = [f"tokenizer={chat['tokenizer']}", "format=chat", "num_proc=1"]
    rows = [  # (name, the third record, the template, what the error says)
        ("no_messages", {"messages": []}, chat["template"], "`messages` is not a non-empty list"),
        ("unknown_role", {"messages": [{"role": "robot", "content": "Hi."}, ANSWER]}, chat["template"], "'robot'"),
        ("empty_answer", {"messages": [USER, {"role": "assistant", "content": " "}]}, chat["template"],
         "empty assistant turn"),
        ("no_answer", {"messages": [USER]}, chat["template"], "has no assistant turn"),
        ("template_refuses", GOOD, refusing, "System role not supported"),
    ]
    tokenizer = Tokenizer(chat["tokenizer"])
    for k, (name, bad, template, why) in enumerate(rows):
        source = tmp_path / f"{name}.jsonl"
        source.write_text(records(plain, plain, bad))
        folder = tmp_path / f"out_{name}"
        folder.mkdir()
        if k < len(rows) - 1:  # in this process, the builder the command calls
            with pytest.raises(ValueError) as raised:
                build_chat_shards([str(source)], folder / "set", tokenizer, template=str(template), num_proc=1,
                                  progress=False)
            message = str(raised.value)
            assert message.startswith(f"{source}: record 3 ") and why in message and "\n" not in message, message
        else:  # the last through the command: one line, a non-zero exit
            one_error(data_pipeline("build", f"inputs=[{source}]", f"out_dir={folder / 'set'}",
                                    f"template={template}", *common), f"{source}: record 3 ", why)
        assert nothing_built(folder), name

    folder = tmp_path / "out_no_template"
    folder.mkdir()
    one_error(data_pipeline("build", f"inputs=[{chat['inputs'][0]}]", f"out_dir={folder / 'set'}", *common),
              str(chat["tokenizer"]), "template=")
    assert nothing_built(folder)

    folder = tmp_path / "out_full_disk"  # the inputs are the chat fixture's, already in the datasets cache
    folder.mkdir()
    full = data_pipeline("build", f"inputs=[{','.join(map(str, chat['inputs']))}]", f"out_dir={folder / 'set'}",
                         f"template={chat['template']}", *common, preexec_fn=limit_file_size)
    one_error(full, f"no space left on {folder / '.set.partial'}")
    assert nothing_built(folder)
