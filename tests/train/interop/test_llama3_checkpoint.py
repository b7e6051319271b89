"""Continued pretraining of Llama 3 from its published checkpoints: Hugging Face folders and Meta's original
format (params.json + consolidated.NN.pth: q/k rows permuted, model-parallel files joined), logits against
transformers' Llama on the same weights, the checks on what init_from is given, one 2-rank run through
launch/pretrain.py and its export back to transformers.

The artifacts are made here: a Llama-3-format tokenizer (llama3_artifacts.py, 128,256 tokens, trained on real
text), a tiny Llama-3-shaped model (GQA, Llama 3.1 rope scaling; a tied 3.2-style one) saved by transformers, and
the same weights converted to Meta's format by the converter below (written from Meta's layout, not ours)."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from data_pipeline.sample_corpus import sample_corpus_dir
from data_pipeline.tokenizer import Tokenizer
from model import ModelConfig, RopeScaling, build_model, preset
from model.hf import from_hf_config
from model.meta import config_from_params
from train.interop.hf_import import check_same_model, init_from, load_any_weights
from train.interop.offline_checkpoint import load_checkpoint_weights

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[3]
from helpers import env, losses, pretrain  # noqa: E402
from llama3_artifacts import llama3_tokenizer  # noqa: E402

VOCAB, DIM, LAYERS, HEADS, KV, MULTIPLIER, MULTIPLE_OF = 128256, 64, 2, 4, 2, 1.3, 32
# Meta's SwiGLU width: 2/3 of 4*dim, times the multiplier, rounded up: int(1.3 * 170) = 221 -> 224.
HIDDEN = MULTIPLE_OF * -(-int(MULTIPLIER * int(2 * 4 * DIM / 3)) // MULTIPLE_OF)
TOL = 1e-4
CONTEXT = 131072  # Llama 3.1's max_position_embeddings, as the stand-ins' config.json says
# Meta's module names for transformers' (the inverse of what a converter to transformers maps).
META_NAMES = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
              "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
              "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3", "mlp.down_proj": "feed_forward.w2",
              "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}
# fairscale's ColumnParallelLinear (and Llama 3's VocabParallelEmbedding) split rows, RowParallelLinear columns.
BY_ROWS = ("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight", "output.weight", "tok_embeddings.weight")
BY_COLUMNS = ("wo.weight", "w2.weight")


def hf_config(tied: bool) -> dict:
    """A Llama 3.1 8B (untied, rope factor 8) or 3.2 1B (tied, factor 32) config.json, shrunk."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": DIM,
            "intermediate_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
            "num_key_value_heads": KV, "head_dim": DIM // HEADS, "vocab_size": VOCAB, "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0, "max_position_embeddings": CONTEXT, "tie_word_embeddings": tied,
            "rope_scaling": {"rope_type": "llama3", "factor": 32.0 if tied else 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
            "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu"}


def our_config(tied: bool) -> ModelConfig:
    """The same model as a run of preset 8b (3.2: 1b) with model.dim= ... overrides gets."""
    return ModelConfig(dim=DIM, n_layers=LAYERS, n_heads=HEADS, n_kv_heads=KV, vocab_size=VOCAB, ffn_hidden_dim=HIDDEN,
                       rope_theta=500000.0, rope_scaling=RopeScaling(factor=32.0 if tied else 8.0), norm_eps=1e-5,
                       tie_embeddings=tied)


def hf_model(tied: bool):
    """transformers' Llama with every weight random (norms too, so that each one is seen to load)."""
    torch.manual_seed(7 + tied)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config(tied))).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
    return model


def to_meta_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """transformers' q/k rows (pairs (i, i + Hd/2)) in Meta's order (pairs (2i, 2i + 1)), head by head."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def meta_state(hf_state: dict, tied: bool) -> dict[str, torch.Tensor]:
    """transformers' state dict in Meta's names and rotary layout (a tied model's head stored again as
    output.weight, as Meta's Llama 3.2 files have it)."""
    out = {"tok_embeddings.weight": hf_state["model.embed_tokens.weight"], "norm.weight": hf_state["model.norm.weight"],
           "output.weight": hf_state["model.embed_tokens.weight" if tied else "lm_head.weight"]}
    for key, value in hf_state.items():
        parts = key.split(".")  # model.layers.<i>.<module>.<proj>.weight
        if parts[:2] == ["model", "layers"]:
            layer, rest = parts[2], ".".join(parts[3:-1])
            if rest == "self_attn.q_proj":
                value = to_meta_rows(value, HEADS)
            elif rest == "self_attn.k_proj":
                value = to_meta_rows(value, KV)
            out[f"layers.{layer}.{META_NAMES[rest]}.weight"] = value
    return {k: v.clone() for k, v in out.items()}


def write_meta(folder: Path, state: dict, parts: int, tokenizer: Path, **params) -> Path:
    """params.json, consolidated.NN.pth (each a model-parallel slice) and tokenizer.model, as Meta ships them.
    More files than KV heads (Llama 3.1 405B: 16 files, 8 KV heads): each KV head repeated in files / heads
    consecutive files, as llama-models' reshard_mp makes them (wk, wv repeated, then split)."""
    folder.mkdir(parents=True)
    kv = params.get("n_kv_heads", KV)
    for i in range(parts):
        part = {}
        for name, value in state.items():
            dim = 0 if name.endswith(BY_ROWS) else 1 if name.endswith(BY_COLUMNS) else None
            if name.endswith(("wk.weight", "wv.weight")) and parts > kv:
                value = value.view(kv, -1, value.shape[1]).repeat_interleave(parts // kv, dim=0).flatten(0, 1)
            part[name] = value if dim is None or parts == 1 else value.chunk(parts, dim)[i].clone()
        torch.save(part, folder / f"consolidated.{i:02d}.pth")
    meta = {"dim": DIM, "n_layers": LAYERS, "n_heads": HEADS, "n_kv_heads": KV, "vocab_size": VOCAB,
            "ffn_dim_multiplier": MULTIPLIER, "multiple_of": MULTIPLE_OF, "norm_eps": 1e-05, "rope_theta": 500000.0,
            "use_scaled_rope": True, **params}
    (folder / "params.json").write_text(json.dumps(meta))
    if tokenizer is not None:
        (folder / "tokenizer.model").write_bytes(tokenizer.read_bytes())
    return folder


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    """The tokenizer; HF folders (with the tokenizer files, as downloaded) and Meta folders (one file, and two
    model-parallel files) of an untied 3.1-style model and a tied 3.2-style one; transformers' logits."""
    tok = llama3_tokenizer(tmp_path_factory.getbasetemp() / "llama3_tokenizer")
    root = tmp_path_factory.mktemp("llama3_ckpt")
    tiktoken = tok / "original" / "tokenizer.model"
    probe = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(3))
    out = {"tok": tok, "tiktoken": tiktoken, "probe": probe, "root": root, "shards_tokenizer": Tokenizer(tok / "hf")}
    for tied, name in ((False, "3.1"), (True, "3.2")):
        out[f"model-{name}"] = model = hf_model(tied)
        model.save_pretrained(root / f"hf-{name}")
        for f in (tok / "hf").iterdir():
            (root / f"hf-{name}" / f.name).write_bytes(f.read_bytes())
        state = meta_state(model.state_dict(), tied)
        write_meta(root / f"meta-{name}", state, 1, tiktoken)
        if not tied:
            write_meta(root / "meta-3.1-mp2", state, 2, tiktoken)
        with torch.no_grad():
            out[f"logits-{name}"] = model(probe).logits
    return out


@pytest.mark.parametrize("source", ["hf-3.1", "meta-3.1", "meta-3.1-mp2", "hf-3.2", "meta-3.2"])
def test_init_from_gives_transformers_logits(llama3, source):
    """Each format, tied or not, one or two model-parallel files: our model after init_from computes transformers'
    logits on the same weights, and load_any_weights reads the same. Two of them are also checked against the
    shards' tokenizer (tokenizer.json): the Meta folder's tiktoken file is the same tokenizer in another format."""
    tied = "3.2" in source
    model = build_model(our_config(tied), seed=123).eval()
    shards_tokenizer = llama3["shards_tokenizer"] if source in ("meta-3.1", "hf-3.2") else None
    init_from(llama3["root"] / source, model, tokenizer=shards_tokenizer)
    with torch.no_grad():
        assert (model(llama3["probe"]) - llama3[f"logits-{'3.2' if tied else '3.1'}"]).abs().max() < TOL
    cfg, state = load_any_weights(llama3["root"] / source)
    assert cfg.tie_embeddings is tied and cfg.rope_scaling == our_config(tied).rope_scaling
    assert init_from(llama3["root"] / source, model) == CONTEXT  # config.json's (Meta's: 131072 with scaled rope)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_converter_writes_meta_rotary_layout(llama3):
    """The test's converter is right, independently of our loader: attention scores from its Meta-layout wq/wk
    under Meta's rotary (complex products of interleaved pairs) equal those from transformers' weights under
    transformers' rotary (rotate_half); so the parity above tests our q/k permutation, not its own inverse."""
    hf = llama3["model-3.1"].state_dict()
    meta = meta_state(hf, False)
    x = torch.randn(10, DIM, generator=torch.Generator().manual_seed(4))
    hd, pos = DIM // HEADS, torch.arange(10.0)
    freqs = 1.0 / (500000.0 ** (torch.arange(0, hd, 2).float() / hd))
    angles = torch.outer(pos, freqs)  # (T, Hd/2)
    rotation = torch.polar(torch.ones_like(angles), angles)[:, None]  # (T, 1, Hd/2) complex

    def meta_rope(t):  # (T, heads, Hd), pairs (2i, 2i+1) as complex numbers, as llama-models' apply_rotary_emb
        return torch.view_as_real(torch.view_as_complex(t.reshape(*t.shape[:-1], -1, 2)) * rotation).flatten(2)

    def hf_rope(t):  # pairs (i, i + Hd/2), as transformers' apply_rotary_pos_emb
        cos, sin = torch.cat([angles, angles], -1).cos()[:, None], torch.cat([angles, angles], -1).sin()[:, None]
        return t * cos + torch.cat([-t[..., hd // 2:], t[..., :hd // 2]], -1) * sin

    def scores(wq, wk, rope):
        q, k = rope((x @ wq.T).view(10, HEADS, hd)), rope((x @ wk.T).view(10, KV, hd))
        return torch.einsum("thd,shd->hts", q, k.repeat_interleave(HEADS // KV, dim=1))

    theirs = scores(hf["model.layers.0.self_attn.q_proj.weight"], hf["model.layers.0.self_attn.k_proj.weight"], hf_rope)
    ours = scores(meta["layers.0.attention.wq.weight"], meta["layers.0.attention.wk.weight"], meta_rope)
    assert (theirs - ours).abs().max() < 1e-5
    assert not torch.allclose(meta["layers.0.attention.wq.weight"], hf["model.layers.0.self_attn.q_proj.weight"])


def one_error(call) -> str:
    with pytest.raises((ValueError, OSError)) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("field, value", [("n_kv_heads", 4), ("n_layers", 3), ("dim", 128),
                                          ("ffn_dim_multiplier", 1.5), ("vocab_size", 128000)])
def test_params_json_that_disagrees_with_the_tensors_is_refused(llama3, tmp_path, field, value):
    """A params.json not of these tensors: one line naming the file and the field; the model is not touched."""
    folder = tmp_path / "meta"
    folder.mkdir()
    os.symlink(llama3["root"] / "meta-3.1" / "consolidated.00.pth", folder / "consolidated.00.pth")
    params = json.loads((llama3["root"] / "meta-3.1" / "params.json").read_text())
    (folder / "params.json").write_text(json.dumps({**params, field: value}))
    model = llama3.setdefault("untouched", build_model(our_config(False), seed=1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    message = one_error(lambda: init_from(folder, model))
    assert message.startswith(f"{folder / 'params.json'}: {field}={value} disagrees with the consolidated tensors")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_meta_folder_in_16_files_with_repeated_kv_heads(tmp_path):
    """Llama 3.1 405B as Meta ships it: 16 model-parallel files, 8 KV heads, each KV head in two files. Joined to
    the model's own weights (no 16-head wk); a folder whose copies differ is refused naming the real reason."""
    cfg = replace(our_config(False), n_heads=16, n_kv_heads=8, vocab_size=1024)
    model = build_model(cfg, seed=5).eval()
    ours = model.state_dict()
    meta = {k: to_meta_rows(v, 16 if "wq" in k else 8) if k.endswith(("wq.weight", "wk.weight")) else v
            for k, v in ours.items()}  # our names are Meta's; q/k rows to Meta's rotary layout
    folder = write_meta(tmp_path / "meta-405b-mp16", meta, 16, None, n_heads=16, n_kv_heads=8, vocab_size=1024)
    wk = torch.load(folder / "consolidated.03.pth")["layers.0.attention.wk.weight"]
    assert wk.shape == (cfg.head_dim, DIM)  # one KV head a file: 16 in all, 8 of them copies
    loaded_cfg, loaded = load_any_weights(folder)
    assert loaded_cfg.kv_heads == 8 and set(loaded) == set(ours)
    assert all(torch.equal(loaded[k], v) for k, v in ours.items())
    other = build_model(cfg, seed=6).eval()
    init_from(folder, other)
    probe = torch.randint(0, 1024, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(other(probe), model(probe))
    # File 5 holds another head where it should hold file 4's copy: not one checkpoint.
    part = torch.load(folder / "consolidated.05.pth")
    part["layers.1.attention.wv.weight"] = part["layers.1.attention.wv.weight"] + 1
    torch.save(part, folder / "consolidated.05.pth")
    message = one_error(lambda: init_from(folder, build_model(cfg, seed=6)))
    assert message.startswith(f"{folder / 'consolidated.05.pth'}: layers.1.attention.wv.weight differs from "
                              "consolidated.04.pth's, but 16 files of a model with n_kv_heads=8 (params.json) hold "
                              "each KV head in 2 files alike")


def swapped_tokenizer(tiktoken: Path, dest: Path) -> Path:
    """Another tokenizer of the same size, BOS and EOS: each pair of neighbouring merged tokens (ids 256-4095, what
    the BPE learnt) trades ids, so any English text gets other ids."""
    tokens = [line.split(" ")[0] for line in tiktoken.read_text().splitlines()]
    for i in range(256, 4096, 2):
        tokens[i], tokens[i + 1] = tokens[i + 1], tokens[i]
    dest.write_text("\n".join(f"{t} {i}" for i, t in enumerate(tokens)) + "\n")
    return dest


def test_init_from_refuses_another_tokenizer_and_a_small_embedding(llama3, tmp_path):
    """Shards built with another tokenizer than the checkpoint's (the same size: only ids differ), or with a
    vocabulary larger than its embedding: one line naming both; the model is not touched."""
    model = build_model(our_config(False), seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    other = Tokenizer(swapped_tokenizer(llama3["tiktoken"], tmp_path / "tokenizer.model"))
    for source in ("meta-3.1-mp2", "hf-3.1"):
        message = one_error(lambda: init_from(llama3["root"] / source, model, tokenizer=other))
        assert f"init_from={llama3['root'] / source} comes with the tokenizer" in message
        assert f"data.tokenizer={other.path}, another one" in message and "other ids" in message
    # A folder without tokenizer files whose embedding has fewer rows than the tokenizer has tokens.
    small = tmp_path / "small"
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**hf_config(False), "vocab_size": 1024})).save_pretrained(
        small)
    message = one_error(lambda: init_from(small, model, tokenizer=llama3["shards_tokenizer"]))
    assert f"{small} has 1024 embedding rows but data.tokenizer={llama3['tok'] / 'hf'} has {VOCAB} tokens" in message
    # A tied (3.2) checkpoint into an untied model: refused by key.
    message = one_error(lambda: init_from(llama3["root"] / "meta-3.2", model))
    assert "model.tie_embeddings=True but this model has False" in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.fixture(scope="module")
def shards(llama3, tmp_path_factory):
    """A shard set of one Shakespeare play, built by the CLI with the downloaded folder's tokenizer."""
    out = tmp_path_factory.mktemp("llama3_shards") / "shards"
    play = sorted(sample_corpus_dir().glob("*.txt"))[0]
    build = subprocess.run([sys.executable, "-m", "data_pipeline", "build", f"inputs=[{play}]", f"out_dir={out}",
                            f"tokenizer={llama3['tok'] / 'hf'}", "txt_mode=paragraph", "val_fraction=0.1",
                            "num_proc=1"], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    return out


def run_overrides(shards: Path, tok: Path, init: Path) -> list[str]:
    """A tiny continued-pretraining run of the 8b preset's kind (rope factor 8, untied)."""
    return ["model.preset=8b", f"model.dim={DIM}", f"model.n_layers={LAYERS}", f"model.n_heads={HEADS}",
            f"model.n_kv_heads={KV}", f"model.ffn_hidden_dim={HIDDEN}", "data.demo=false", f"data.tokenizer={tok}",
            f"data.shards=[{shards}]", "data.seq_len=64", "data.unigram_baseline=false", f"checkpoint.init_from={init}",
            "steps=6", "global_batch_size=4", "micro_batch_size=2", "log_interval=1", "val_batches=1",
            "optim.warmup_steps=1", "optim.lr=3e-3", "wandb.mode=disabled", "sample_prompt=''"]


def test_continued_pretraining_from_meta_format_then_export(llama3, shards, tmp_path):
    """Shards built by the CLI with the HF folder's tokenizer; 2 ranks (FSDP) continue from Meta's format split in
    two model-parallel files, whose tiktoken tokenizer.model is the same tokenizer in another format. Step 1's loss is
    transformers' on the same batch; the loss falls. The export (tokenizer files copied as they are; and, from the
    tiktoken file, a tokenizer.json plus original/tokenizer.model) loads in transformers with our logits and encodes
    as the downloaded folder does."""
    from data_pipeline.loader import ShardSet, TokenLoader

    hf_tok, run, out = llama3["tok"] / "hf", tmp_path / "run", tmp_path / "exported"
    pretrain(2, run, *run_overrides(shards, hf_tok, llama3["root"] / "meta-3.1-mp2"))
    # Step 1's loss is the loaded model's, on global samples 0-3 (a function of the seed alone).
    batch = next(TokenLoader(ShardSet.open(shards), seq_len=64, global_batch_size=4, seed=0))
    with torch.no_grad():
        logits = llama3["model-3.1"](torch.as_tensor(batch["input_ids"])).logits
    want = F.cross_entropy(logits.flatten(0, 1), torch.as_tensor(batch["labels"]).flatten(), ignore_index=-100)
    curve = losses(run)
    assert abs(curve[1] - want.item()) < TOL and curve[6] < curve[1] - 0.3, curve

    export = subprocess.run([sys.executable, str(ROOT / "launch" / "export_hf.py"), f"checkpoint={run}", f"out={out}"],
                            cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stderr[-3000:]
    from train.interop.hf_export import export_hf
    step = run / "checkpoints" / "step_00000006"
    from_tiktoken = export_hf(step, tmp_path / "exported_tiktoken", tokenizer_path=llama3["tiktoken"])
    assert (from_tiktoken / "original" / "tokenizer.model").read_bytes() == llama3["tiktoken"].read_bytes()
    assert all((out / f.name).read_bytes() == f.read_bytes() for f in hf_tok.iterdir())

    cfg, state = load_checkpoint_weights(step)
    ours = build_model(cfg, seed=0).eval()
    ours.load_state_dict(state)
    text = "ROMEO: Wherefore art thou?\n  12345 héllo ✓ 日本"
    downloaded = transformers.AutoTokenizer.from_pretrained(hf_tok).encode(text)
    assert downloaded == [128000] + Tokenizer(hf_tok).encode(text)
    # The run trained at 64 positions (the preset's max_seq_len 8192) but the model is Llama 3.1's: its context,
    # 131072, is carried from init_from through the checkpoint to the export, and on from there.
    for folder in (out, from_tiktoken):
        config = json.loads((folder / "config.json").read_text())
        assert (config["bos_token_id"], config["eos_token_id"]) == (128000, 128001)
        assert config["max_position_embeddings"] == CONTEXT, config
        assert json.loads((folder / "generation_config.json").read_text())["max_length"] == CONTEXT
        assert json.loads((folder / "tokenizer_config.json").read_text())["model_max_length"] == CONTEXT
        assert transformers.AutoTokenizer.from_pretrained(folder).encode(text) == downloaded
        theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            assert (theirs(llama3["probe"]).logits - ours(llama3["probe"])).abs().max() < TOL
    assert cfg.max_seq_len == 8192 and init_from(step, ours) == CONTEXT


def test_pretrain_refuses_shards_of_another_tokenizer_than_the_checkpoint(llama3, shards, tmp_path):
    """launch/pretrain.py from a Meta folder whose tokenizer.model is another BPE than the shards': one line naming
    both, and no checkpoint written."""
    folder = tmp_path / "meta"
    folder.mkdir()
    for f in ("consolidated.00.pth", "consolidated.01.pth", "params.json"):
        os.symlink(llama3["root"] / "meta-3.1-mp2" / f, folder / f)
    swapped_tokenizer(llama3["tiktoken"], folder / "tokenizer.model")
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "pretrain.py"), "+conf=debug", f"hydra.run.dir={run}",
                           *run_overrides(shards, llama3["tok"] / "hf", folder)], cwd=tmp_path, env=env(),
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-3000:]
    assert (f"init_from={folder} comes with the tokenizer {folder / 'tokenizer.model'}, but the shards were built "
            f"with data.tokenizer={llama3['tok'] / 'hf'}, another one") in lines[0]
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())


# Published configs (config.json of meta-llama's Hugging Face releases, params.json of their original/ folders).
PUBLISHED = {
    "1b": (dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, factor=32.0,
                tied=True), dict(dim=2048, n_layers=16, n_heads=32, ffn_dim_multiplier=1.5, multiple_of=256)),
    "3b": (dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24, factor=32.0,
                tied=True), dict(dim=3072, n_layers=28, n_heads=24, ffn_dim_multiplier=1.0, multiple_of=256)),
    "8b": (dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, factor=8.0,
                tied=False), dict(dim=4096, n_layers=32, n_heads=32, ffn_dim_multiplier=1.3, multiple_of=1024)),
    "70b": (dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64, factor=8.0,
                 tied=False), dict(dim=8192, n_layers=80, n_heads=64, ffn_dim_multiplier=1.3, multiple_of=4096)),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_are_the_published_llama3_checkpoints(name):
    """Both formats of Llama 3.2 1B/3B and 3.1 8B/70B, as published, are the presets' models (what init_from checks
    before reading a tensor), so `+conf=cpt_8b` (preset 8b) accepts the downloaded folder."""
    hf, params = PUBLISHED[name]
    factor, tied = hf.pop("factor"), hf.pop("tied")
    config = {**hf, "num_key_value_heads": 8, "vocab_size": VOCAB, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
              "tie_word_embeddings": tied, "max_position_embeddings": 131072,
              "rope_scaling": {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192}}
    params = {**params, "n_kv_heads": 8, "vocab_size": VOCAB, "norm_eps": 1e-5, "rope_theta": 500000.0,
              "use_scaled_rope": True}
    want = preset(name, vocab_size=VOCAB)
    check_same_model(from_hf_config(config), want, Path("config.json"))
    check_same_model(config_from_params(params, tied, Path("params.json")), want, Path("params.json"))
