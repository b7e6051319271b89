"""llm-eval format=chat: the answer-only loss of held-out conversations equals transformers' over each conversation
alone, packed windows included, overlong ones dropped or truncated and counted; a chat shard set gives the same
figures as its records; bad input fails in one line. A tiny transformers Llama with random weights (an HF folder)
and the tests' 512-piece SentencePiece tokenizer with a template file, all in this process."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_pipeline.chat import TRAINED, ChatEncoder, messages_of
from data_pipeline.chat_build import build_chat_shards
from data_pipeline.sample_pairs import write_pairs
from data_pipeline.tokenizer import Tokenizer
from launch import eval as eval_cli
from launch.generate import load_model
from train.evaluation.chat_data import chat_batches, pack_source

from helpers import tiny_data

transformers = pytest.importorskip("transformers")

TEMPLATE = ("{% for m in messages %}{% if loop.first %}{{ bos_token }}{% endif %}<|{{ m['role'] }}|>\n"
            "{{ m['content'] }}{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    """The tokenizer, its template file, a held-out JSONL (prompt/completion and multi-turn records), a tiny
    transformers Llama saved as an HF folder, and that model in memory (eager attention, fp32)."""
    root = tmp_path_factory.mktemp("eval_chat")
    data = dict(o.split("=", 1) for o in tiny_data(tmp_path_factory))
    tok_path = Path(data["data.tokenizer"])
    tok = Tokenizer(tok_path)
    (root / "chat.jinja").write_text(TEMPLATE)
    pairs = write_pairs(root / "pairs", per_play=8, max_chars=160)
    records = [json.loads(line) for name in ("classify.jsonl", "dialogue.jsonl")
               for line in (pairs / name).read_text().splitlines()][::2]
    (root / "held.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    torch.manual_seed(3)
    config = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=512, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                                      tie_word_embeddings=False, attn_implementation="eager")
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # big enough weights that attention and each token matter
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    model.save_pretrained(root / "hf")
    encoder = ChatEncoder(tok, str(root / "chat.jinja"))
    encoded = [encoder.encode(messages_of(r)) for r in records]
    return {"root": root, "tok": tok, "text_set": data["data.shards"].strip("[]"), "records": records,
            "encoded": encoded, "hf": model,
            "args": [f"checkpoint={root / 'hf'}", f"tokenizer={tok_path}", f"template={root / 'chat.jinja'}",
                     "format=chat", "device=cpu"]}


def run_eval(chat, name: str, *argv: str) -> dict:
    out = chat["root"] / f"{name}.json"
    eval_cli.main([*chat["args"], *argv, f"out={out}"])
    return json.loads(out.read_text())["rows"][0]


def seq_len_of(chat) -> int:
    """A window the longest conversation overflows and several shorter ones share."""
    return int(max(len(ids) for ids, _ in chat["encoded"])) - 9


def by_hand(chat, seq_len: int, overlong: str) -> tuple[float, int, int]:
    """(summed cross-entropy of the assistant tokens, their count, their bytes): each conversation alone through
    transformers, one longer than seq_len + 1 dropped or cut to it."""
    table, _ = chat["tok"].token_bytes()
    nats, count, n_bytes = 0.0, 0, 0
    for ids, mask in chat["encoded"]:
        if len(ids) > seq_len + 1:
            if overlong == "drop":
                continue
            ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
        with torch.no_grad():
            logits = chat["hf"](torch.from_numpy(ids[None, :-1])).logits[0].double()
        trained = torch.from_numpy(mask[1:] == TRAINED)
        labels = torch.from_numpy(ids[1:])
        nats += F.cross_entropy(logits[trained], labels[trained], reduction="sum").item()
        count += int(trained.sum())
        n_bytes += int(table[labels[trained].numpy()].sum())
    return nats, count, n_bytes


@pytest.mark.parametrize("overlong", ["drop", "truncate"])
def test_answer_loss_equals_transformers_per_conversation(chat, capsys, overlong):
    seq_len = seq_len_of(chat)
    row = run_eval(chat, overlong, f"data=[{chat['root'] / 'held.jsonl'}]", f"seq_len={seq_len}", "batch_size=2",
                   f"overlong={overlong}")
    out = capsys.readouterr().out
    nats, count, n_bytes = by_hand(chat, seq_len, overlong)
    n = len(chat["records"])
    done = {"drop": "dropped", "truncate": "truncated"}[overlong]
    assert row["conversations"] == n and row[done] == 1
    assert row["windows"] < n - 1  # several conversations share a window
    assert f"1 of {n} conversations longer than seq_len + 1 were {done}" in out, out
    assert row["tokens"] == count and row["bytes"] == n_bytes
    assert math.isclose(row["loss"], nats / count, rel_tol=1e-5, abs_tol=1e-5), (row, nats / count)
    assert math.isclose(row["bits_per_byte"], nats / math.log(2) / n_bytes, rel_tol=1e-5)
    if overlong == "drop":  # the answers' own text, each end of turn (</s>, a special token) no byte
        kept = [r for r, (ids, _) in zip(chat["records"], chat["encoded"]) if len(ids) <= seq_len + 1]
        answers = [m["content"] for r in kept for m in messages_of(r) if m["role"] == "assistant"]
        assert chat["tok"].token_bytes()[0][chat["tok"].eos_id] == 0
        assert n_bytes == sum(len(a.encode()) for a in answers)

def test_packed_window_gives_each_conversation_its_loss_alone(chat):
    """A window of the packing holds several conversations: with the document mask (which llm-eval turns on for
    chat) each one's per-token loss is its loss alone; without it, the later ones see the earlier."""
    tok, seq_len = chat["tok"], seq_len_of(chat)
    packing = pack_source(str(chat["root"] / "held.jsonl"), tok, str(chat["root"] / "chat.jinja"), seq_len, "drop")
    w = int(np.argmax(np.diff(packing.ptr)))  # the window with the most conversations
    batch = list(chat_batches(packing, tok.bos_id, seq_len, 1, 0, 1))[w]
    members = packing.members[packing.ptr[w]:packing.ptr[w + 1]].tolist()
    assert len(members) >= 3
    model = load_model(chat["root"] / "hf", torch.device("cpu"))
    lengths = [len(chat["encoded"][c][0]) for c in members]
    for masking in (True, False):
        model.document_masking = masking
        with torch.no_grad():
            logits = model(batch["input_ids"], position_ids=batch["position_ids"])[0].double()
        ce = F.cross_entropy(logits, batch["labels"][0], reduction="none", ignore_index=-100)
        at, same = 0, []
        for c, n in zip(members, lengths):
            ids, mask = chat["encoded"][c]
            with torch.no_grad():
                alone = chat["hf"](torch.from_numpy(ids[None, :-1])).logits[0].double()
            alone_ce = F.cross_entropy(alone, torch.from_numpy(ids[1:]), reduction="none")
            trained = torch.from_numpy(mask[1:] == TRAINED)
            assert torch.equal(batch["labels"][0, at:at + n - 1] != -100, trained)
            same.append(torch.allclose(ce[at:at + n - 1][trained], alone_ce[trained], rtol=1e-5, atol=1e-5))
            at += n
        assert all(same) if masking else not all(same[1:]), (masking, same)


def test_chat_shard_set_gives_its_records_figures(chat, tmp_path):
    """A set built with format=chat from the same records, read through validation_batches: the same rows."""
    folder = build_chat_shards([str(chat["root"] / "held.jsonl")], tmp_path / "set", chat["tok"],
                               template=str(chat["root"] / "chat.jinja"), num_proc=1, progress=False).parent
    common = [f"seq_len={seq_len_of(chat)}", "batch_size=1", "overlong=truncate"]
    from_set = run_eval(chat, "set", f"data=[{folder}:train]", *common)
    from_records = run_eval(chat, "records", f"data=[{chat['root'] / 'held.jsonl'}]", *common)
    for key in ("tokens", "bytes", "conversations", "truncated", "windows"):
        assert from_set[key] == from_records[key], key
    assert abs(from_set["loss"] - from_records["loss"]) < 1e-6


@pytest.mark.parametrize("wrong", ["bad record", "text file", "text set", "chat set as text", "no template"])
def test_one_line_errors(chat, tmp_path, capsys, wrong):
    root = chat["root"]
    args = [a for a in chat["args"] if not a.startswith("template=") or wrong != "no template"]
    if wrong == "bad record":
        data, says = tmp_path / "bad.jsonl", f"{tmp_path / 'bad.jsonl'}: record 2 has no assistant turn"
        data.write_text(json.dumps(chat["records"][0]) + "\n" + json.dumps({"messages": [
            {"role": "user", "content": "Who's there?"}]}) + "\n")
    elif wrong == "text file":
        data, says = tmp_path / "notes.txt", "format=chat reads .jsonl"
        data.write_text("Nay, answer me.\n")
    elif wrong == "text set":
        data, says = chat["text_set"], "holds text, not conversations"
    elif wrong == "chat set as text":
        data = build_chat_shards([str(root / "held.jsonl")], tmp_path / "set", chat["tok"], val_fraction=0.5,
                                 template=str(root / "chat.jinja"), num_proc=1, progress=False).parent
        args, says = [a for a in args if a != "format=chat"], "pass format=chat"
    else:
        data, says = root / "held.jsonl", "no chat template there"
    with pytest.raises(SystemExit) as exited:
        eval_cli.main([*args, f"data=[{data}]", "seq_len=300", "batch_size=1", f"out={tmp_path / 'x.json'}"])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert exited.value.code == 1 and not (tmp_path / "x.json").exists()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], err
    if wrong == "no template":
        assert "template=" in lines[0]

