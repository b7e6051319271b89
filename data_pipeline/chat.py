"""Conversations to tokens with the tokenizer's own chat template, and which of those tokens are trained.

A record is {"messages": [{"role": ..., "content": ...}, ...]} or {"prompt": ..., "completion": ...} (a user turn
and an assistant turn). It is rendered as transformers' `apply_chat_template` renders it (the same Jinja sandbox,
settings and helpers), and its special tokens are parsed as `tokenizers` parses them (the text is cut at every
added token, and the pieces between are encoded alone). The trained tokens are each assistant turn's content and
its end of turn: the text that rendering the turns up to it adds to rendering the turns before it with the
generation prompt (Llama 3: `<|start_header_id|>assistant<|end_header_id|>\\n\\n`), up to the last special token
in it, so no header, system or user token (nor a newline a template puts between turns) is ever trained.

Each conversation's mask is one byte a token: TRAINED, NOT_TRAINED, or START (its first token, never trained).
"""

import json
import re
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import numpy as np

from .tokenizer import Tokenizer
from .tokenizer_hf import configured_specials

ROLES = ("system", "user", "assistant")
NOT_TRAINED, TRAINED, START = 0, 1, 2
TEMPLATE_FILES = ("chat_template.jinja",)  # newer Hugging Face releases keep the template in its own file


class RecordError(ValueError):
    """A record that cannot be trained on: its message says which and the fix (the caller adds where it is)."""


def read_template(tokenizer: Tokenizer, template: str = "") -> tuple[str, str]:
    """The chat template's text and where it came from: `template` (a Jinja file, or a model folder or its
    tokenizer_config.json, e.g. the Instruct model's for a base model), else the tokenizer's own
    (chat_template.jinja, or chat_template in tokenizer_config.json beside it)."""
    if template:
        path = Path(template)
        if not path.exists():
            raise FileNotFoundError(f"template={template}: no such file; pass a Jinja chat template file (or a "
                                    f"model folder whose tokenizer_config.json has one)")
        if path.is_file() and path.suffix != ".json":
            return path.read_text(encoding="utf-8"), str(path)
        return _configured_template(path if path.is_dir() else path.parent, f"template={template}")
    return _configured_template(tokenizer.file.parent, str(tokenizer.path))


def _configured_template(folder: Path, named: str) -> tuple[str, str]:
    """A model folder's template: chat_template.jinja, or tokenizer_config.json's chat_template."""
    for name in TEMPLATE_FILES:
        if (folder / name).is_file():
            return (folder / name).read_text(encoding="utf-8"), str(folder / name)
    config = folder / "tokenizer_config.json"
    found = json.loads(config.read_text(encoding="utf-8")).get("chat_template") if config.is_file() else None
    if isinstance(found, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        found = next((t.get("template") for t in found if isinstance(t, dict) and t.get("name") == "default"), None)
    if not isinstance(found, str) or not found.strip():
        raise ValueError(f"{named}: no chat template there (no chat_template in {config.name}); pass "
                         f"template=path/to/chat_template.jinja, or the folder of a model that has one")
    return found, str(config)


@lru_cache(maxsize=8)
def _compile(source: str):
    """The template in transformers' environment: sandboxed, trim_blocks, lstrip_blocks, loop controls, its
    tojson, raise_exception and strftime_now; {% generation %} blocks render their body."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"the chat template does not parse (line {e.lineno}: {e.message}); fix it or pass "
                         f"template=") from None


def messages_of(record: dict) -> list[dict]:
    """A record's conversation, checked: known roles, text content, at least one assistant turn, none empty."""
    if record.get("messages") is not None:
        messages = record["messages"]
    elif record.get("prompt") is not None and record.get("completion") is not None:
        messages = [{"role": "user", "content": record["prompt"]},
                    {"role": "assistant", "content": record["completion"]}]
    else:
        raise RecordError("has neither `messages` nor `prompt` and `completion`; write {\"messages\": [{\"role\": "
                          "\"user\", \"content\": ...}, ...]} or {\"prompt\": ..., \"completion\": ...}")
    if not isinstance(messages, list) or not messages:
        raise RecordError("`messages` is not a non-empty list of {\"role\", \"content\"} turns")
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ROLES:
            raise RecordError(f"turn {i} has role {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise RecordError(f"turn {i} ({role}) has no text `content`; give each turn its text")
        if role == "assistant" and not m["content"].strip():
            raise RecordError(f"turn {i} is an empty assistant turn, which would train nothing; drop or fill it")
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordError("has no assistant turn, so nothing in it would be trained; add the answer")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


class ChatEncoder:
    """Renders conversations with a chat template and tokenizes them with their trained-token masks."""

    def __init__(self, tokenizer: Tokenizer, template: str = ""):
        self.tokenizer = tokenizer
        self.source, self.template_path = read_template(tokenizer, template)
        self.template = _compile(self.source)
        self.names = _template_tokens(tokenizer)
        specials = _special_strings(tokenizer)
        self.split = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        import jinja2
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        tools=None, documents=None, **self.names)
        except jinja2.TemplateError as e:
            raise RecordError(f"the chat template failed to render it ({' '.join(str(e).split())}); fix the "
                              f"record or pass template=") from None

    def trained_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The whole conversation's text and the character spans of its assistant turns (content + turn end)."""
        text, spans = self.render(messages), []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True) if i else ""
            upto = self.render(messages[:i + 1])
            if not (upto.startswith(before) and text.startswith(upto)) or len(upto) == len(before):
                raise RecordError(f"the chat template renders turn {i} differently alone than within the "
                                  f"conversation, so its assistant tokens cannot be told; pass template= with one "
                                  f"that renders turn by turn")
            spans.append((len(before), self._turn_end(upto, len(before))))
        return text, spans

    def _turn_end(self, text: str, start: int) -> int:
        """Where an assistant turn's trained text ends: after the last special token it holds (its end of turn:
        <|eot_id|>, </s>), not after the plain text some templates add between turns (a newline)."""
        ends = [m.end() for m in self.split.finditer(text, start)] if self.split else []
        return ends[-1] if ends else len(text)

    def encode(self, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, mask) of one conversation: int64 ids, uint8 mask (START on the first token, TRAINED on the
        assistant turns' tokens, NOT_TRAINED elsewhere)."""
        text, spans = self.trained_spans(messages)
        cuts = sorted({c for span in spans for c in span} | {0, len(text)})
        ids, trained, pos = [], [], 0
        for piece in (self.split.split(text) if self.split else [text]):
            if piece:
                inner = [c - pos for c in cuts if pos < c < pos + len(piece)]
                for sub_ids, start in self._encode_piece(piece, inner):
                    ids += sub_ids
                    trained += [any(a <= pos + start < b for a, b in spans)] * len(sub_ids)
            pos += len(piece)
        if not ids:
            raise RecordError("renders to no tokens; check the record and the template")
        mask = np.where(trained, TRAINED, NOT_TRAINED).astype(np.uint8)
        mask[0] = START
        return np.asarray(ids, dtype=np.int64), mask

    def encode_prompt(self, messages: list[dict]) -> list[int]:
        """The ids of a conversation rendered with the generation prompt, for a model to answer (llm-generate): the
        text split at special tokens as `encode` splits it, so they come out as one id each, as in training."""
        return self.encode_text(self.render(messages, add_generation_prompt=True))

    def encode_text(self, text: str) -> list[int]:
        """Ids of rendered text (its special tokens one id each, as in training): lm-eval's chat contexts."""
        ids = []
        for piece in (self.split.split(text) if self.split else [text]):
            if piece:
                ids += [i for sub_ids, _ in self._encode_piece(piece, []) for i in sub_ids]
        return ids

    def turn_end_id(self) -> int | None:
        """The special token the template ends an assistant turn with (Llama 3: <|eot_id|>, ChatML: <|im_end|>):
        the first one after the answer in a rendered one-turn conversation; None where plain text follows it."""
        answer = "Answer."
        text = self.render([{"role": "user", "content": "Question?"}, {"role": "assistant", "content": answer}])
        end = text.rfind(answer)
        found = self.split.search(text, end + len(answer)) if self.split and end >= 0 else None
        return self.tokenizer.token_to_id(found.group(0)) if found else None

    def _encode_piece(self, piece: str, cuts: list[int]) -> list[tuple[list[int], int]]:
        """A special token's id, or a text piece's ids cut where a span begins or ends inside it: [(ids, first
        character)]. The cut falls after the tokens that encoding the text before it gives alone; a token across
        it (a merge over the boundary) goes with the later part."""
        special = self.tokenizer.token_to_id(piece) if self.split and self.split.fullmatch(piece) else None
        if special is not None:
            return [([special], 0)]
        ids = self.tokenizer.encode(piece)
        out, last_token, last_char = [], 0, 0
        for c in cuts:
            head = self.tokenizer.encode(piece[:c])
            k = next((i for i, (x, y) in enumerate(zip(head, ids)) if x != y), min(len(head), len(ids)))
            out.append((ids[last_token:k], last_char))
            last_token, last_char = k, c
        return out + [(ids[last_token:], last_char)]


def prompt_messages(messages) -> list[dict]:
    """A conversation for a model to answer, checked: a non-empty list of {"role", "content"} turns with known roles
    and text content, the last not the assistant's (RecordError saying which turn and the fix)."""
    if not isinstance(messages, list) or not messages:
        raise RecordError("is not a non-empty JSON list of {\"role\", \"content\"} turns")
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ROLES:
            raise RecordError(f"turn {i} has role {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise RecordError(f"turn {i} ({role}) has no text `content`; give each turn its text")
    if messages[-1]["role"] == "assistant":
        raise RecordError("ends with an assistant turn; end with the user turn the model is to answer")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _template_tokens(tokenizer: Tokenizer) -> dict[str, str]:
    """bos_token/eos_token as the template sees them: what tokenizer_config.json names (as transformers passes
    them, an Instruct model's <|eot_id|> included), else the tokenizer's document markers."""
    named = {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token}
    if tokenizer.format == "huggingface":
        for key, found in configured_specials(tokenizer.source_files).items():
            named[key] = next(iter(found.values()), named[key])
    return named


def _special_strings(tokenizer: Tokenizer) -> list[str]:
    """The strings that stand for one special token in rendered text, longest first: the added tokens of a
    tokenizer.json (or Llama 3's), a SentencePiece model's control pieces."""
    if tokenizer.sp is not None:
        sp = tokenizer.sp
        found = [sp.IdToPiece(i) for i in range(sp.GetPieceSize()) if sp.IsControl(i)]
    else:
        found = [t.content for t in tokenizer.backend.get_added_tokens_decoder().values()]
    return sorted({s for s in found if s}, key=len, reverse=True)
