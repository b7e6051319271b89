"""Demo data in one call: a tokenizer and shards from the sample corpus, made once and reused; for the fine-tuning
demo, Shakespeare's speeches as labelled pairs (sample_pairs.py) in chat shards, and an lm-eval task over the
held-out ones."""

from pathlib import Path

from .build import build_shards
from .locking import file_lock
from .sample_corpus import sample_corpus_dir
from .tokenizer import Tokenizer, train_tokenizer


def ensure_demo_data(out_dir, vocab_size: int = 8192, val_fraction: float = 0.1,
                     shard_tokens: int = 1 << 24, progress: bool = True) -> tuple[Path, Path]:
    """Return (tokenizer model path, shards dir) under out_dir, training/building whatever is missing.

    Safe to call from every rank at once: an fcntl lock on out_dir/.lock lets one process build
    while the others wait, then they all find the finished files.
    """
    out_dir = Path(out_dir)
    model_path = out_dir / f"tokenizer_{vocab_size}.model"
    shards_dir = out_dir / f"shards_{vocab_size}"
    with file_lock(out_dir / ".lock"):
        corpus = [str(sample_corpus_dir())]
        tokenizer = Tokenizer(model_path) if model_path.is_file() else \
            train_tokenizer(corpus, model_path, vocab_size, txt_mode="file")
        # build_shards is a no-op when a finished build of the same inputs and tokenizer is there
        build_shards(corpus, shards_dir, tokenizer, txt_mode="file", val_fraction=val_fraction,
                     shard_tokens=shard_tokens, overwrite=True, progress=progress)
    return model_path, shards_dir


# The demo's chat format: its SentencePiece tokenizer has no chat tokens, so the turn markers are text and its
# </s> (a control piece, one token) ends each turn, which makes it the token the model learns to stop at.
DEMO_TEMPLATE = ("{% for m in messages %}{% if loop.first %}{{ bos_token }}{% endif %}<|{{ m['role'] }}|>\n"
                 "{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
# lm-evaluation-harness task: which of the three plays a held-out speech is from, scored as multiple choice
# (accuracy: the play whose name, as the answer, has the highest log-likelihood); chance is 1/3
PLAY_TASK = """task: shakespeare_play
dataset_path: json
dataset_kwargs:
  data_files: {{test: {held}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: ["Hamlet", "Macbeth", "Othello"]
doc_to_target: "{{{{completion}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def ensure_demo_chat_data(out_dir, tokenizer_path, progress: bool = True) -> tuple[Path, Path]:
    """Return (chat template file, chat shards dir) under out_dir: the pairs of data/demo/pairs/train/ in chat
    shards of the demo tokenizer; data/demo/pairs/held/ are never trained on, and pairs/tasks/ holds the lm-eval
    task over them (llm-eval ... tasks=[shakespeare_play] task_dir=data/demo/pairs/tasks chat=true)."""
    from .chat_build import build_chat_shards
    from .sample_pairs import write_split_pairs

    out_dir = Path(out_dir)
    template, shards_dir = out_dir / "chat_template.jinja", out_dir / f"chat_{Path(tokenizer_path).stem}"
    with file_lock(out_dir / ".lock"):
        pairs = write_split_pairs(out_dir / "pairs")
        if not template.is_file():
            template.write_text(DEMO_TEMPLATE, encoding="utf-8")
        (pairs / "tasks").mkdir(exist_ok=True)
        (pairs / "tasks" / "shakespeare_play.yaml").write_text(
            PLAY_TASK.format(held=(pairs / "held" / "classify.jsonl").resolve()), encoding="utf-8")
        build_chat_shards([str(pairs / "train")], shards_dir, Tokenizer(tokenizer_path), template=str(template),
                          val_fraction=0.1, overwrite=True, progress=progress)
    return template, shards_dir
