"""The docs check: every fenced command in README.md and docs/*.md runs here (a block marked `cpu`), or names the
test that runs it (`test=PATH`), or says what it needs (`gpu`, `cluster`, `hub`); every program a command names
exists, a training command's overrides are keys of the config, every relative link resolves, and the README stays
short. docs/development.md describes the markers."""

import importlib
import re
import shlex
import shutil
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import REPO, TINY, env, tiny_data

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def shown(page: Path) -> Path:
    """The page as messages name it: relative to the checkout."""
    return page.relative_to(REPO) if page.is_relative_to(REPO) else page
COMMAND_LANGS = {"bash", "sh", "shell"}
OTHER_LANGS = {"text", "yaml", "json", "python", "toml"}  # output and files: not run
NEEDS = {"gpu", "cluster", "hub"}  # what a command needs that the CPU suite has not: GPUs, nodes or SLURM, the Hub
OUTSIDE = {"torchrun", "tensorboard", "huggingface-cli", "sacct", "sbatch", "scancel", "scontrol", "wandb", "pip",
           "venv"}  # venv: `python3 -m venv .venv`, the set-up's first command
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"].get("scripts", {})  # name: module:main
COMMANDS = {"llm-pretrain", "llm-eval", "llm-export-hf", "llm-generate", "llm-plan", "llm-report"}  # the README's
TRAINING = {"launch/pretrain.py", "llm-pretrain", "launch/slurm/pretrain.sbatch"}  # what takes the config's overrides
README_MAX_LINES = 200
LINE_MAX = 120


@dataclass
class Block:
    """A fenced block: where it starts, its language and markers (the info string's words), its lines."""
    where: str
    lang: str
    markers: list[str]
    lines: list[str]


def blocks(page: Path) -> list[Block]:
    lines, found, i = page.read_text().splitlines(), [], 0
    while i < len(lines):
        if lines[i].startswith("```"):
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            lang, *markers = lines[i][3:].split() or [""]
            found.append(Block(f"{shown(page)}:{i + 1}", lang, markers, lines[i + 1:end]))
            i = end
        i += 1
    return found


def commands(block: Block) -> list[str]:
    """The block's commands, continuation lines joined, comment-only lines dropped."""
    joined = "\n".join(block.lines).replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if shlex.split(line, comments=True)]


def program(words: list[str]) -> str:
    """What a command runs: the script or module after its launcher (python, torchrun, bash, sbatch), else the
    command itself; `VAR=value` words before it are its environment."""
    words = [w for w in words if not re.match(r"^[A-Z_][A-Z0-9_]*=", w)]
    first, rest = words[0], words[1:]
    if first in ("python", "python3") and rest[:1] == ["-m"]:
        return rest[1]
    if first in ("python", "python3", "bash", "torchrun", "sbatch"):
        return next((w for w in rest if re.search(r"\.(py|sh|sbatch)$", w)), first)
    return first


def program_exists(name: str) -> bool:
    """A command of [project.scripts], a file of the checkout, a module with __main__.py, or a known outside tool."""
    if name in SCRIPTS or name in OUTSIDE:
        return True
    if re.search(r"\.(py|sh|sbatch)$", name):
        return (REPO / name).is_file()
    return (REPO / name.replace(".", "/") / "__main__.py").is_file()


def spellings(name: str) -> set[str]:
    """How a test may name the program: as written, its file name, its module, a call of the helper named after it
    (`pretrain(...)` of helpers.py runs launch/pretrain.py), for one of our commands its module and file, and
    for a script of scripts/ the Python programs it runs."""
    if name in SCRIPTS:
        module = SCRIPTS[name].split(":")[0]
        return {name, module, *spellings(module.replace(".", "/") + ".py")}
    found = {name, Path(name).name}
    if name.endswith(".py"):
        found |= {name[:-3].replace("/", "."), f"{Path(name).stem}("}
    if name.startswith("scripts/") and (REPO / name).is_file():
        found |= set(re.findall(r"\b[\w/]+\.py\b", (REPO / name).read_text()))
    return found


def training_overrides(words: list[str]) -> list[str] | None:
    """The config overrides of a training command (None for another command); `...` placeholders left out."""
    at = next((i for i, w in enumerate(words) if w in TRAINING), None)
    if at is None:
        return None
    return [w for w in words[at + 1:] if "=" in w and not w.startswith("-") and "..." not in w]


def marker_problems(block: Block) -> list[str]:
    """What is wrong with a block's language and markers; checks that each named test file exists."""
    if block.lang in OTHER_LANGS:
        return []
    if block.lang not in COMMAND_LANGS:
        return [f"{block.where}: fence says no language or an unknown one ({block.lang!r}); write ```bash MARKER "
                f"for commands, ```text for output"]
    problems = []
    known = [m for m in block.markers if m == "cpu" or m in NEEDS or m.startswith("test=")]
    if not known or len(known) != len(block.markers):
        problems.append(f"{block.where}: ```bash needs markers from cpu, test=PATH, gpu, cluster, hub (has "
                        f"{block.markers}); see docs/development.md")
    if "cpu" in block.markers and NEEDS & set(block.markers):
        problems.append(f"{block.where}: `cpu` blocks run here; they cannot also need {NEEDS & set(block.markers)}")
    for test in (m.removeprefix("test=") for m in block.markers if m.startswith("test=")):
        if not (REPO / test).is_file():
            problems.append(f"{block.where}: test={test} names no file of the checkout")
    return problems


def command_problems(block: Block, command: str) -> list[str]:
    """What is wrong with one command: a program that does not exist, one the named tests never name, or an
    override the config does not take."""
    from train import config

    words = shlex.split(command, comments=True)
    name = program(words)
    if not program_exists(name):
        return [f"{block.where}: `{command}` runs {name}, which is no file, module or command of the checkout"]
    problems = []
    tests = [REPO / m.removeprefix("test=") for m in block.markers if m.startswith("test=")]
    texts = [t.read_text() for t in tests if t.is_file()]
    if texts and name not in OUTSIDE and not any(spelling in text for spelling in spellings(name) for text in texts):
        problems.append(f"{block.where}: `{command}`: {name} appears in none of {[str(t.name) for t in tests]}")
    overrides = training_overrides(words)
    problem = overrides and config.check_overrides(overrides, REPO / "conf")
    if problem:
        problems.append(f"{block.where}: `{command}`: {problem}")
    return problems


def problems_of(page: Path) -> list[str]:
    found = []
    for block in blocks(page):
        found += marker_problems(block)
        if block.lang in COMMAND_LANGS:
            found += [p for command in commands(block) for p in command_problems(block, command)]
    return found


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def link_problems(page: Path) -> list[str]:
    """Relative links whose file, or whose #anchor in it, does not exist."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)  # no links inside code
    problems = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.is_file():
            problems.append(f"{shown(page)}: link ({target}): no file {file}")
        elif anchor and anchor not in {slug(h) for h in re.findall(r"^#+ (.*)$", file.read_text(), re.M)}:
            problems.append(f"{shown(page)}: link ({target}): no heading with that anchor in {path or page.name}")
    return problems


def test_every_command_block_is_marked_and_names_what_exists():
    problems = [p for page in PAGES for p in problems_of(page)]
    assert not problems, "\n".join(problems)


def test_links_resolve_and_every_page_is_linked_from_the_readme():
    problems = [p for page in PAGES for p in link_problems(page)]
    assert not problems, "\n".join(problems)
    readme = (REPO / "README.md").read_text()
    unlinked = [p.name for p in PAGES[1:] if f"(docs/{p.name}" not in readme]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


def test_the_readme_is_short_and_lines_are_of_normal_length():
    readme = (REPO / "README.md").read_text().splitlines()
    assert len(readme) <= README_MAX_LINES, f"README.md has {len(readme)} lines; move detail into docs/"
    long = [f"{page.relative_to(REPO)}:{n}" for page in PAGES for n, line in enumerate(page.read_text().splitlines(), 1)
            if len(line) > LINE_MAX and not line.startswith("|")]  # a table row is one line however wide
    assert not long, f"lines over {LINE_MAX} characters: {long}"


def test_every_command_is_installed_and_resolves_to_its_main():
    assert COMMANDS <= set(SCRIPTS), f"[project.scripts] lacks {sorted(COMMANDS - set(SCRIPTS))}"
    for name, target in SCRIPTS.items():
        module, _, function = target.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), target
        assert shutil.which(name), f"{name} is not on the PATH: `pip install -e .` (scripts/install.sh) installs it"


def test_the_check_names_what_is_wrong(tmp_path):
    """The check itself can fail: an unmarked block, an unknown program, a test that never runs the program, a
    misspelt override and a dead link are each named."""
    page = tmp_path / "page.md"
    page.write_text("```bash\nllm-plan +conf=70b gpus=64\n```\n\n"
                    "```bash test=tests/train/planner/test_plan.py\nllm-nope x=1\n"
                    "llm-report outputs/debug\n```\n\n```bash gpu\ntorchrun launch/pretrain.py +conf=8b optim.lrr=1\n"
                    "```\n\n```\nno language\n```\n\n[gone](nowhere.md) [there](#nothing)\n")
    blocks_found = blocks(page)
    page_problems = [p for b in blocks_found for p in marker_problems(b)]
    page_problems += [p for b in blocks_found[:3] for c in commands(b) for p in command_problems(b, c)]
    said = "\n".join(page_problems + link_problems(page))
    for expected in ("needs markers", "llm-nope, which is no file", "llm-report appears in none of",
                     "unknown key 'optim.lrr'", "no language", "no file", "no heading with that anchor"):
        assert expected in said, said


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """A folder holding outputs/debug, a tiny run finished by the `llm-pretrain` command, where `cpu` blocks run."""
    folder = tmp_path_factory.mktemp("docs_cpu")
    command = shutil.which("llm-pretrain")
    assert command, "llm-pretrain is not on the PATH: `pip install -e .` (scripts/install.sh) installs the commands"
    tiny = [o for o in TINY if not o.startswith("steps=")]
    run = subprocess.run([command, "+conf=debug", *tiny, "steps=2", f"hydra.run.dir={folder / 'outputs' / 'debug'}",
                          *tiny_data(tmp_path_factory)], cwd=folder, env=env(), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return folder


def cpu_commands() -> dict[str, str]:
    """Each command of the `cpu` blocks, once, with where it first appears."""
    found = {}
    for block in (b for page in PAGES for b in blocks(page) if "cpu" in b.markers):
        for command in commands(block):
            found.setdefault(shlex.join(shlex.split(command, comments=True)), block.where)
    return found


CPU_COMMANDS = [(where, command) for command, where in cpu_commands().items()]


@pytest.mark.parametrize("where, command", CPU_COMMANDS, ids=[command for _, command in CPU_COMMANDS])
def test_cpu_command_runs(scratch, where, command):
    done = subprocess.run(["bash", "-c", command], cwd=scratch, env=env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip(), f"{where}: `{command}` exited {done.returncode}: " \
                                                         f"{done.stderr[-2000:]}"
