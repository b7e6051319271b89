"""Input text through Hugging Face `datasets`: files, directories, globs and hub names, as one 'text' column."""

import codecs
import glob
import itertools
import os
import socket
from pathlib import Path

import numpy as np

from .disk import no_space
from .shuffle import Permutation

KINDS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
TXT_MODES = {"file": "document", "line": "line", "paragraph": "paragraph"}  # ours -> datasets' sample_by
ENCODING_ERRORS = ("strict", "replace")  # what a .txt input's invalid UTF-8 does: fail naming the byte, or U+FFFD
HUB_PREFIX = "hf:"


def resolve_inputs(inputs) -> list[str]:
    """Expand directories (recursively) and globs into a sorted, de-duplicated list of files; keep hub names."""
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    if not inputs:
        raise ValueError("inputs is empty; pass inputs=[file, dir, glob or hf:name, ...]")
    resolved = []
    for item in map(str, inputs):
        if item.startswith(HUB_PREFIX):
            resolved.append(item)
        else:
            resolved += [path for path in map(_checked_file, _files_of(item)) if path not in resolved]
    return resolved


def _files_of(item: str) -> list[str]:
    """The files one input names: a glob's matches, a directory's files of a known kind, or the file itself."""
    if glob.has_magic(item):
        matches = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
    elif os.path.isdir(item):
        matches = sorted(str(p) for p in Path(item).rglob("*") if p.is_file() and p.suffix in KINDS)
    elif os.path.isfile(item):
        matches = [item]
    else:
        raise FileNotFoundError(f"{item}: input not found; fix the path (hub datasets are written hf:owner/name)")
    if not matches:
        raise FileNotFoundError(f"{item}: matches no {'/'.join(KINDS)} files; fix the path or pattern")
    return matches


def _checked_file(path: str) -> str:
    """path, if it is a file the builder can read: a known kind and not empty."""
    if Path(path).suffix not in KINDS:
        raise ValueError(f"{path}: unsupported file type; use {', '.join(KINDS)}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: input file is empty; remove it from inputs")
    return path


def describe_inputs(files: list[str]) -> list[dict]:
    """Path, size and mtime of each resolved input: what the manifest records and the build fingerprint hashes."""
    out = []
    for f in files:
        if f.startswith(HUB_PREFIX):
            out.append({"path": f})
        else:
            st = os.stat(f)
            out.append({"path": os.path.abspath(f), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def _require_hub():
    """Fail fast, without waiting on retries, when the hub cannot be reached."""
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        raise ValueError("HF_HUB_OFFLINE is set; hub inputs need internet: download the data and pass local files")
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
    except OSError:
        raise ValueError("huggingface.co is unreachable (offline?); hub inputs need internet: "
                         "pass local files") from None


def _load_hub(spec: str, text_field: str):
    import datasets
    _require_hub()
    name, _, config = spec[len(HUB_PREFIX):].partition(":")
    ds = datasets.load_dataset(name, config or None, split="train")
    return _text_column(ds, text_field, spec)


def _text_column(ds, text_field: str, where: str):
    """Keep only text_field, renamed to 'text'; one-line error when it is absent or null."""
    import datasets
    if text_field not in ds.column_names:
        raise ValueError(f"{where}: records have no field {text_field!r} (fields: {ds.column_names}); "
                         f"set text_field=")
    if ds.features[text_field] not in (datasets.Value("string"), datasets.Value("large_string")):
        raise ValueError(f"{where}: field {text_field!r} holds {ds.features[text_field]}, not text; set text_field=")
    ds = ds.select_columns([text_field])
    nulls = ds.data.column(text_field).null_count
    if nulls:
        raise ValueError(f"{where}: {nulls} of {len(ds)} records have a null {text_field!r}; give them text or "
                         f"remove them")
    return ds.rename_column(text_field, "text") if text_field != "text" else ds


def _diagnose(files: list[str], kind: str, text_field: str) -> str:
    """One-line reason naming the first file that cannot be read or has records without text_field."""
    import pyarrow.json as pj
    import pyarrow.parquet as pq
    for f in files:
        try:
            table = pq.read_table(f) if kind == "parquet" else pj.read_json(f)
        except Exception as e:
            if f.endswith(".json"):  # a JSON array/object file, which pyarrow cannot read but datasets can
                continue
            return f"{f}: cannot read as {kind} ({str(e).splitlines()[0][:120]}); fix the file"
        wrong = _text_field_problem(table, text_field, kind)
        if wrong:
            return f"{f}: {wrong}"
    return f"{', '.join(files)}: cannot read as {kind} with text field {text_field!r}; fix the files or set text_field="


def _text_field_problem(table, text_field: str, kind: str) -> str | None:
    """What is wrong with one file's text field: absent, null in some records (which, and how many), or not text."""
    import pyarrow as pa
    import pyarrow.compute as pc
    if text_field not in table.column_names:
        return f"records have no field {text_field!r} (fields: {table.column_names}); set text_field="
    column = table.column(text_field)
    if column.null_count:
        first = pc.index(column.is_null(), True).as_py() + 1
        null = "missing or null" if kind == "json" else "null"  # pyarrow reads a JSON record without it as null
        return (f"{column.null_count} of {len(column)} records have a {null} {text_field!r} (the first: record "
                f"{first}); give them text or remove them")
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        return f"field {text_field!r} holds {column.type}, not text; set text_field= to the field with the text"
    return None


def first_invalid_utf8(path) -> tuple[int, str] | None:
    """(byte offset, reason) of the first invalid UTF-8 in a file, or None when it all decodes."""
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with open(path, "rb") as f:
        for block in itertools.chain(iter(lambda: f.read(1 << 24), b""), [None]):  # None: the end of the file
            pending = len(decoder.getstate()[0])  # bytes of a character begun in the previous block
            try:
                decoder.decode(block or b"", final=block is None)
            except UnicodeDecodeError as e:
                return offset - pending + e.start, e.reason
            offset += len(block or b"")
    return None


def _cache_full(e: Exception):
    """A NoSpaceError when datasets failed for want of space in its cache (where it converts inputs to Arrow)."""
    import datasets
    return no_space(e, datasets.config.HF_DATASETS_CACHE, what="the inputs' Arrow cache",
                    fix="free some space there or point HF_DATASETS_CACHE to a disk with room")


def _text_error(e: Exception, files: list[str]) -> Exception:
    """What a failed load of .txt files means, in one line: a full disk under the datasets cache, or the first
    file with invalid UTF-8 and where; else e itself."""
    full = _cache_full(e)
    if full is not None:
        return full
    for f in files:
        bad = first_invalid_utf8(f)
        if bad is not None:
            return ValueError(f"{f}: not UTF-8 text (byte {bad[0]}: {bad[1]}); fix or re-encode the file, remove it "
                              f"from inputs, or pass encoding_errors=replace to replace bad bytes with U+FFFD")
    return e


def _load_text(files: list[str], txt_mode: str, encoding_errors: str):
    import datasets
    if txt_mode not in TXT_MODES:
        raise ValueError(f"txt_mode={txt_mode!r} is not one of {list(TXT_MODES)}")
    if encoding_errors not in ENCODING_ERRORS:
        raise ValueError(f"encoding_errors={encoding_errors!r} is not one of {list(ENCODING_ERRORS)}")
    try:
        # 'file' documents are the files' exact text; 'line' documents drop the newline (EOS separates them)
        return datasets.load_dataset("text", data_files=files, split="train", sample_by=TXT_MODES[txt_mode],
                                     encoding_errors=encoding_errors)
    except Exception as e:  # datasets wraps the cause (a UnicodeDecodeError, a full disk) without the file's name
        error = _text_error(e, files)
        if error is e:
            raise
        raise error from None


def _load_files(files: list[str], kind: str, text_field: str, txt_mode: str, encoding_errors: str):
    import datasets
    if kind == "text":
        return _load_text(files, txt_mode, encoding_errors)
    try:
        return _text_column(datasets.load_dataset(kind, data_files=files, split="train"), text_field, "")
    except Exception as e:  # datasets raises several types (mixed schemas, parse errors): name the file instead
        raise (_cache_full(e) or ValueError(_diagnose(files, kind, text_field))) from None


def load_documents(inputs, text_field: str = "text", txt_mode: str = "file", encoding_errors: str = "strict"):
    """One `datasets.Dataset` with a 'text' column: all inputs, in the order given, files sorted within each."""
    import datasets
    datasets.disable_progress_bars()  # the builder shows its own
    files = resolve_inputs(inputs)
    parts, run = [], []
    for item in files + [None]:  # consecutive files of one kind load in a single call
        kind = None if item is None or item.startswith(HUB_PREFIX) else KINDS[Path(item).suffix]
        if run and (kind != KINDS[Path(run[0]).suffix]):
            parts.append(_load_files(run, KINDS[Path(run[0]).suffix], text_field, txt_mode, encoding_errors))
            run = []
        if item is not None and kind is None:
            parts.append(_load_hub(item, text_field))
        elif kind is not None:
            run.append(item)
    if len({str(p.features["text"]) for p in parts}) > 1:  # string vs large_string: concatenation needs one
        parts = [p.cast_column("text", datasets.Value("large_string")) for p in parts]
    docs = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if len(docs) == 0:
        raise ValueError(f"{', '.join(files)}: inputs hold no documents; check txt_mode and the files")
    return docs


def sample_documents(docs, seed: int = 0, batch: int = 256):
    """Texts of all documents in a seeded shuffled order (a tokenizer sees every part of the corpus early)."""
    order = Permutation(len(docs), "tokenizer-sample", seed)
    for start in range(0, len(docs), batch):
        idx = order(np.arange(start, min(start + batch, len(docs))))
        yield from docs[idx.tolist()]["text"]
