"""Conversations to tokens and trained-token masks (data_pipeline/chat.py), checked against transformers'
apply_chat_template on a real Llama-3-format tokenizer with Llama 3 Instruct's template; packing (packing.py)."""

import json
import shutil

import numpy as np
import pytest
from llama3_artifacts import llama3_tokenizer

from data_pipeline.chat import NOT_TRAINED, START, TRAINED, ChatEncoder, RecordError, messages_of, read_template
from data_pipeline.loader import windows_to_batch
from data_pipeline.packing import best_fit_decreasing
from data_pipeline.tokenizer import Tokenizer

# Meta-Llama-3-8B-Instruct's tokenizer_config.json chat_template
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# The same rendering with the assistant turns in {% generation %} blocks: transformers' own assistant-token mask
GENERATION_TEMPLATE = (
    "{% for message in messages %}{% if loop.index0 == 0 %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}{% else %}"
    "{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

CONVERSATIONS = [
    messages_of({"prompt": "Which play is this from? To be, or not to be, that is the question.",
                 "completion": "Hamlet"}),
    [{"role": "system", "content": "You speak as the characters of Macbeth."},
     {"role": "user", "content": "FIRST WITCH: When shall we three meet again?"},
     {"role": "assistant", "content": "SECOND WITCH: When the hurlyburly's done, When the battle's lost and won."},
     {"role": "user", "content": "  THIRD WITCH: That will be ere the set of sun.\n"},
     {"role": "assistant", "content": " 'Tis 1606, and 42 of us:\n\nfair is foul, and foul is fair!"}],
    [{"role": "user", "content": "Who wrote Moby-Dick? (It says <|eot_id|> here.)"},
     {"role": "assistant", "content": "Herman Melville, in 1851."}],
]


@pytest.fixture(scope="module")
def instruct(tmp_path_factory):
    """A Llama-3-format tokenizer folder (trained on real text) whose config carries the Instruct template."""
    folder = llama3_tokenizer(tmp_path_factory.getbasetemp() / "llama3_tokenizer")
    hf = tmp_path_factory.mktemp("instruct")
    shutil.copytree(folder / "hf", hf, dirs_exist_ok=True)
    config = json.loads((hf / "tokenizer_config.json").read_text())
    (hf / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": LLAMA3_TEMPLATE}))
    (hf / "generation.jinja").write_text(GENERATION_TEMPLATE)
    return hf


@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=["prompt_completion", "system_multi_turn", "special"])
def test_tokens_and_masks_equal_transformers(instruct, conversation):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(instruct))
    ids, mask = ChatEncoder(Tokenizer(instruct)).encode(conversation)
    assert ids.tolist() == list(ref.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"])
    tracked = ref.apply_chat_template(conversation, tokenize=True, return_dict=True,
                                      chat_template=GENERATION_TEMPLATE, return_assistant_tokens_mask=True)
    assert tracked["input_ids"] == ids.tolist()  # the two templates render alike
    assert ((mask == TRAINED).astype(int)).tolist() == list(tracked["assistant_masks"])
    assert mask[0] == START and set(mask[1:].tolist()) <= {NOT_TRAINED, TRAINED}
    trained = ref.decode([int(i) for i, m in zip(ids, mask) if m == TRAINED])
    answers = [m["content"].strip() + "<|eot_id|>" for m in conversation if m["role"] == "assistant"]
    assert trained == "".join(answers)


def test_template_file_overrides_and_a_tokenizer_without_one_is_refused(instruct, tmp_path):
    source, where = read_template(Tokenizer(instruct), str(instruct / "generation.jinja"))
    assert source == GENERATION_TEMPLATE and where.endswith("generation.jinja")
    for other_model in (instruct, instruct / "tokenizer_config.json"):  # a base model takes an Instruct's template
        assert read_template(Tokenizer(instruct), str(other_model))[0] == LLAMA3_TEMPLATE
    bare = tmp_path / "bare"
    shutil.copytree(instruct, bare)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no chat template there.*pass template="):
        ChatEncoder(Tokenizer(bare))
    with pytest.raises(FileNotFoundError, match="template=nowhere.jinja: no such file"):
        ChatEncoder(Tokenizer(bare), "nowhere.jinja")


@pytest.mark.parametrize("record, why", [
    ({"text": "a document"}, "neither `messages` nor `prompt` and `completion`"),
    ({"messages": [{"role": "narrator", "content": "x"}]}, "turn 0 has role 'narrator'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}, "empty assistant"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, "no text `content`"),
])
def test_bad_records_say_why(record, why):
    with pytest.raises(RecordError, match=why):
        messages_of(record)


def test_a_template_that_fails_is_a_record_error(instruct):
    enc = ChatEncoder(Tokenizer(instruct), str(_write(instruct.parent / "raise.jinja",
                                                      "{{ raise_exception('only user turns') }}")))
    with pytest.raises(RecordError, match="failed to render it.*only user turns"):
        enc.encode(CONVERSATIONS[0])


def _write(path, text):
    path.write_text(text)
    return path


def test_best_fit_places_each_conversation_once_within_capacity():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 60, size=500)
    lengths[:7] = 100  # longer than the window: left out by the caller under overlong=drop
    keep = np.flatnonzero(lengths <= 64)
    ptr, members = best_fit_decreasing(lengths, keep, 64)
    assert sorted(members.tolist()) == keep.tolist()
    fill = np.array([lengths[members[a:b]].sum() for a, b in zip(ptr[:-1], ptr[1:])])
    assert fill.max() <= 64
    assert fill.sum() / (64 * len(fill)) > 0.95  # padding under 5%


def test_chat_windows_train_only_assistant_tokens_and_restart_positions():
    tokens = np.arange(10, 20)[None, :]  # two conversations: [10..15] and [16..19]
    marks = np.array([[START, 0, 1, 1, 0, 1, START, 0, 1, 0]], dtype=np.uint8)
    batch = windows_to_batch(tokens, np.array([0]), bos_id=-1, return_positions=False, marks=marks)
    assert batch["labels"][0].tolist() == [-100, 12, 13, -100, 15, -100, -100, 18, -100]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2]


def test_text_a_template_puts_between_turns_is_not_trained(instruct, tmp_path):
    """A template that writes a newline after each turn's end: the newline is the template's, not the answer's."""
    between = _write(tmp_path / "newline.jinja", LLAMA3_TEMPLATE.replace("'<|eot_id|>'", "'<|eot_id|>\n'"))
    enc = ChatEncoder(Tokenizer(instruct), str(between))
    ids, mask = enc.encode(CONVERSATIONS[1])
    assert "<|eot_id|>\n" in enc.render(CONVERSATIONS[1])
    trained = enc.tokenizer.backend.decode([int(i) for i, m in zip(ids, mask) if m == TRAINED],
                                           skip_special_tokens=False)
    assert trained == "".join(m["content"].strip() + "<|eot_id|>" for m in CONVERSATIONS[1] if m["role"] == "assistant")


def test_parquet_records_build_as_jsonl_ones(instruct, tmp_path):
    """The same records from .jsonl and from .parquet give the same shards and masks (`datasets` reads both)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_pipeline.chat_build import build_chat_shards

    records = [{"messages": c} for c in CONVERSATIONS[1:]] * 3
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "a.parquet")
    built = {}
    for suffix in ("jsonl", "parquet"):
        out = build_chat_shards([str(tmp_path / f"a.{suffix}")], tmp_path / suffix, Tokenizer(instruct), num_proc=1,
                                progress=False)
        built[suffix] = [(out.parent / "train" / f).read_bytes() for f in ("000000.bin", "000000.mask.bin")]
        assert json.loads(out.read_text())["splits"]["train"]["documents"] == len(records)
    assert built["jsonl"] == built["parquet"]
