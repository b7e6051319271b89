"""After fine-tuning: the chat template in a Hugging Face export (transformers' apply_chat_template gives the ids our
ChatEncoder gives), and llm-generate answering a conversation (chat=true, messages=) until the end of turn.

On the Llama-3-format tokenizer of llama3_artifacts.py (made here from real text) and a tiny Llama 3-vocabulary
model saved by transformers, its weights set so that it answers every prompt with one known token, then <|eot_id|>."""

import json
from pathlib import Path

import pytest
import torch

from data_pipeline.chat import ChatEncoder
from data_pipeline.tokenizer import Tokenizer
from model import ModelConfig
from train.interop.hf_tokenizer import chat_template_for, export_tokenizer

transformers = pytest.importorskip("transformers")

from llama3_artifacts import llama3_instruct, llama3_tokenizer  # noqa: E402

# Llama 3 Instruct's chat template, as its tokenizer_config.json has it.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CONVERSATION = [{"role": "system", "content": "You answer in one word."},
                {"role": "user", "content": "Wherefore art thou, Romeo?\n  12345 héllo ✓"},
                {"role": "assistant", "content": " Verona. "},
                {"role": "user", "content": "And then?"}]
ANSWER = " whale"  # the one token the tiny model answers with
INSTRUCT_EOS = "eos_token=<|end_of_text|>"  # the document end an Instruct config's <|eot_id|> leaves to be named


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    """The tokenizer (hf/: a base model's config, no template; original/: Meta's tiktoken file), the template as a
    file, an Instruct copy whose tokenizer_config.json has it, and a model folder with the base tokenizer."""
    tok = llama3_tokenizer(tmp_path_factory.getbasetemp() / "llama3_tokenizer")
    root = tmp_path_factory.mktemp("hf_chat")
    template = root / "llama3.jinja"
    template.write_text(LLAMA3_TEMPLATE)
    instruct = llama3_instruct(tok, root / "instruct")
    config = json.loads((instruct / "tokenizer_config.json").read_text())
    (instruct / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": LLAMA3_TEMPLATE}))
    return {"tok": tok, "template": template, "instruct": instruct, "model": answering_model(tok, root / "model")}


def answering_model(tok: Path, folder: Path) -> Path:
    """A 1-layer Llama whose next token depends on the last token alone (attention and MLP outputs zeroed, so the
    last hidden state is its embedding): ANSWER's token after any token, then <|eot_id|>, then ANSWER again."""
    base = Tokenizer(tok / "hf")
    answer, = base.encode(ANSWER)
    eot = base.token_to_id("<|eot_id|>")
    config = transformers.LlamaConfig(vocab_size=base.vocab_size, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=256,
                                      bos_token_id=base.bos_id, eos_token_id=base.eos_id, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.norm.weight.fill_(1.0)
        model.model.embed_tokens.weight[:, 0] = 1.0  # every token: direction 0 ...
        model.model.embed_tokens.weight[answer] = torch.eye(16)[1]  # ... but the answer: direction 1
        model.lm_head.weight[answer, 0] = 5.0  # direction 0 -> the answer
        model.lm_head.weight[eot, 1] = 5.0  # the answer -> end of turn
    model.save_pretrained(folder)
    for f in (tok / "hf").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


@pytest.mark.parametrize("source", ["hf", "tiktoken", "instruct", "base"])
def test_export_carries_the_chat_template(chat, tmp_path, source):
    """The export's tokenizer_config.json has the template (a given file; else the tokenizer's own) and transformers'
    apply_chat_template then gives the ids the chat shards hold, with and without the generation prompt; a
    tokenizer with no template and none given: no key."""
    tok_path = {"hf": chat["tok"] / "hf", "tiktoken": chat["tok"] / "original" / "tokenizer.model",
                "instruct": chat["instruct"], "base": chat["tok"] / "hf"}[source]
    template = str(chat["template"]) if source in ("hf", "tiktoken") else ""
    out = tmp_path / "export"
    out.mkdir()
    markers = ("", "<|end_of_text|>")  # as a run on the Instruct tokenizer sets data.eos_token (its config says eot)
    export_tokenizer(tok_path, out, ModelConfig(vocab_size=128256), *markers,
                     chat_template=chat_template_for(tok_path, template, *markers))
    config = json.loads((out / "tokenizer_config.json").read_text())
    if source == "base":
        assert "chat_template" not in config
        return
    assert config["chat_template"] == LLAMA3_TEMPLATE
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    encoder = ChatEncoder(Tokenizer(tok_path, *markers), template)
    answered = CONVERSATION[:3]
    ids = theirs.apply_chat_template(answered, tokenize=True, return_dict=False)
    assert ids == encoder.encode(answered)[0].tolist()
    prompt = theirs.apply_chat_template(CONVERSATION, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert prompt == encoder.encode_prompt(CONVERSATION)
    assert prompt[0] == 128000 and prompt.count(128009) == 4  # <|begin_of_text|>, an <|eot_id|> after each turn
    assert encoder.turn_end_id() == 128009


def test_generate_answers_a_conversation_until_the_end_of_turn(chat, tmp_path, capsys):
    """chat=true (the prompt one user turn) and messages= (a file, or the JSON itself) print the answer alone,
    stopped at <|eot_id|>: with the base tokenizer (EOS <|end_of_text|>) and template=, and with the Instruct
    tokenizer's own template."""
    from launch.generate import main

    (tmp_path / "chat.json").write_text(json.dumps(CONVERSATION))
    common = [f"path={chat['model']}", "temperature=0", "max_new_tokens=8", "device=cpu"]
    for extra in (["chat=true", "prompt=Wherefore art thou?", f"template={chat['template']}"],
                  [f"messages={tmp_path / 'chat.json'}", f"template={chat['template']}"],
                  [f"messages={json.dumps(CONVERSATION)}", f"tokenizer={chat['instruct']}", INSTRUCT_EOS],
                  ["num_samples=2", "chat=true", "prompt=Hi", f"tokenizer={chat['instruct']}", INSTRUCT_EOS]):
        main(common + extra)
        samples = capsys.readouterr().out.split("-" * 40 + "\n")
        assert samples == [ANSWER + "\n"] * (2 if "num_samples=2" in extra else 1), extra


@pytest.mark.parametrize("given, says", [
    (["messages=nowhere.json"], "messages=nowhere.json: no such file; pass a JSON file"),
    (["messages=[{'role': 'user'}]"], "messages=[{'role': 'user'}]: not JSON"),
    (['messages=[{"role": "bot", "content": "Hi"}]'], "turn 0 has role 'bot'; use one of system, user, assistant"),
    (['messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]'],
     "ends with an assistant turn; end with the user turn"),
    (["chat=true"], "chat=true needs prompt="),
    (["chat=true", "prompt=Hi"], "no chat template there"),
    (["chat=true", "prompt=Hi", "template=nowhere.jinja"], "template=nowhere.jinja: no such file"),
])
def test_generate_refuses_a_bad_conversation_in_one_line(chat, capsys, given, says):
    """Each in one line naming the key and what to pass (no template: the base tokenizer has none, and no
    template= is given), before the model is loaded."""
    from launch.generate import main

    with pytest.raises(SystemExit) as exited:
        main([f"path={chat['model']}", "device=cpu", *given])
    err = capsys.readouterr().err
    assert exited.value.code == 1 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert says in err and ("pass" in err or "use" in err or "end with" in err), err
