"""The commands of README.md and docs/*.md still run as written, and every link there leads somewhere.

Each line of the pages' ```bash blocks is one of:
- ``cycle-encoding SUB ...`` (also after ``torchrun ... -m cycle_encoding.cli``): the subcommand's ``--help`` works,
  every option named is one of that subcommand's own option strings (exactly: argparse would accept an abbreviation,
  so a renamed option could hide behind a longer one), and the whole line parses with the CLI's own parser
  (``cli.build_parser``: values, choices, required options; the parser opens no file, so file names need no stand-in).
  ``[--opt VALUE]`` marks an optional part: it is checked like the rest;
- ``scripts/NAME.sh`` or ``python scripts|benchmarks/NAME.py``: the file exists;
- ``source .venv/bin/activate``: the venv the set-up makes (named in scripts/bootstrap.sh).
Any other line fails the test, so a new kind of line is checked once it is taught here.

A README block preceded by ``<!-- test: run -->`` needs no face file and runs in seconds: its commands are also run,
in a temporary folder, and must succeed (today: ``info`` and ``generate`` on the shipped generator, and
``schedule``); the other blocks need files a user brings (faces, FFHQ checkpoints) or minutes of work.
Inline ``cycle-encoding SUB --opt`` spans in the prose are checked the same way (subcommand and option names), the
feature table's command column too, inline paths into the repository (``src/...``, ``scripts/...``) must exist, and
the ```python blocks must compile and use only names the package has.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import glob
import io
import re
import shlex
import types
from pathlib import Path

import pytest

import cycle_encoding
from cycle_encoding.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
RUN_MARK = "<!-- test: run -->"


# --- reading the Markdown -------------------------------------------------------------------------------------------


def bash_blocks(text: str) -> list[tuple[bool, str]]:
    """(marked to run, body) of each ```bash block, in order."""
    blocks = []
    for m in re.finditer(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        before = text[: m.start()].rstrip().splitlines()
        blocks.append((bool(before) and before[-1].strip() == RUN_MARK, m.group(1)))
    return blocks


def command_lines(block: str) -> list[list[str]]:
    """The block's commands as argument lists: continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", block)
    return [words for line in joined.splitlines() if (words := shlex.split(line, comments=True))]


def without_code_blocks(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def github_anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped (not '-' or '_'), spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text.replace("`", ""))
    return text.replace(" ", "-")


def anchors(md: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6} (.+)$", without_code_blocks(md.read_text(encoding="utf-8")), flags=re.M):
        slug = github_anchor(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(md: Path) -> list[str]:
    """Targets of the page's Markdown links and images, outside code blocks and code spans."""
    text = re.sub(r"`[^`\n]*`", "", without_code_blocks(md.read_text(encoding="utf-8")))
    return re.findall(r"\]\(([^)\s]+)\)", text)


# --- the command line's parsers --------------------------------------------------------------------------------------


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def command_parser(argv: list[str]) -> tuple[list[str], argparse.ArgumentParser]:
    """The (sub)command path of ``argv`` (e.g. ['directions', 'train']) and the parser that reads its options."""
    parser, path = build_parser(), []
    for word in argv:
        if word.startswith("-"):
            continue  # options before the command (--debug) or of it
        choices = _subparsers(parser)
        if not choices:
            break
        assert word in choices, f"`cycle-encoding {' '.join([*path, word])}`: no such command (have {sorted(choices)})"
        parser, path = choices[word], [*path, word]
    assert path, f"no command in {argv}"
    return path, parser


def unknown_options(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    known = set(parser._option_string_actions)
    named = [w.split("=", 1)[0] for w in argv if re.match(r"--?[A-Za-z]", w)]
    return [w for w in named if w not in known]


def package_argv(words: list[str]) -> list[str] | None:
    """The arguments after ``cycle-encoding`` (or ``torchrun ... -m cycle_encoding.cli``); None for other commands.
    Optional parts ``[--opt VALUE]`` lose their brackets."""
    if words[0] == "cycle-encoding":
        argv = words[1:]
    elif words[0] == "torchrun" and "cycle_encoding.cli" in words:
        argv = words[words.index("cycle_encoding.cli") + 1 :]
    else:
        return None
    return [re.sub(r"\]$", "", re.sub(r"^\[(?=-)", "", w)) for w in argv]


def parse_error(argv: list[str]) -> str | None:
    """What argparse says about ``argv`` (None: it parses)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            build_parser().parse_args(argv)
    except SystemExit as e:
        return err.getvalue().strip().splitlines()[-1] if e.code else None
    return None


def other_command_problem(words: list[str]) -> str | None:
    """None when a non-package line of a README block is one the README may show and its file exists."""
    while words and re.match(r"^[A-Z_]+=", words[0]):  # VAR=value prefixes
        words = words[1:]
    if words[0].startswith("scripts/") and words[0].endswith(".sh"):
        path = ROOT / words[0]
        return None if path.is_file() and path.stat().st_mode & 0o111 else f"{words[0]}: no such executable script"
    if words[0] == "python" and len(words) > 1 and re.match(r"(scripts|benchmarks)/\w+\.py$", words[1]):
        return None if (ROOT / words[1]).is_file() else f"{words[1]}: no such file"
    if words[:2] == ["source", ".venv/bin/activate"]:
        bootstrap = (ROOT / "scripts" / "bootstrap.sh").read_text(encoding="utf-8")
        return None if "$ROOT/.venv" in bootstrap else "scripts/bootstrap.sh no longer makes .venv/"
    return f"a command this test does not know how to check: {shlex.join(words)}"


README_TEXT = README.read_text(encoding="utf-8")
BLOCKS = bash_blocks(README_TEXT)
COMMANDS = [(run, words) for run, block in BLOCKS for words in command_lines(block)]
PACKAGE_COMMANDS = [(run, argv) for run, words in COMMANDS if (argv := package_argv(words)) is not None]


def page_commands(md: Path) -> list[list[str]]:
    return [words for _, block in bash_blocks(md.read_text(encoding="utf-8")) for words in command_lines(block)]


DOC_PACKAGE_COMMANDS = [argv for md in DOCS for words in page_commands(md) if (argv := package_argv(words))]
SUBCOMMANDS = sorted(
    {" ".join(command_parser(a)[0]) for a in [*(a for _, a in PACKAGE_COMMANDS), *DOC_PACKAGE_COMMANDS]}
)


def test_the_readme_has_the_commands_this_test_checks():
    """Guards the extraction itself: a README without blocks (or a broken pattern) would make the rest vacuous."""
    assert len(BLOCKS) >= 6, BLOCKS
    assert len(PACKAGE_COMMANDS) >= 20, PACKAGE_COMMANDS
    assert len(DOC_PACKAGE_COMMANDS) >= 20, DOC_PACKAGE_COMMANDS
    assert any(run for run, _ in BLOCKS), f"no block marked {RUN_MARK}"
    assert {"scripts/demo.sh", "scripts/test.sh"} <= {words[0] for _, words in COMMANDS}
    assert {"invert", "edit", "report", "ui", "train-encoder", "train-generator"} <= set(SUBCOMMANDS)


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_each_subcommand_shown_has_help(sub, capsys):
    with pytest.raises(SystemExit) as e:
        main([*sub.split(), "--help"])
    assert e.value.code == 0
    assert f"usage: cycle-encoding {sub}" in capsys.readouterr().out


@pytest.mark.parametrize("md", [README, *DOCS], ids=lambda p: p.name)
def test_each_command_shown_names_real_options_and_parses(md):
    """Every command line of the page's ```bash blocks (README and docs/*.md)."""
    problems = []
    for words in page_commands(md):
        argv = package_argv(words)
        if argv is None:
            problems += [p] if (p := other_command_problem(words)) else []
            continue
        path, parser = command_parser(argv)
        problems += [f"`cycle-encoding {' '.join(path)}` has no option {o}" for o in unknown_options(argv, parser)]
        problems += [f"cycle-encoding {shlex.join(argv)}: {e}"] if (e := parse_error(argv)) else []
    assert not problems, problems


@pytest.mark.parametrize("argv", [argv for run, argv in PACKAGE_COMMANDS if run], ids=lambda a: " ".join(a)[:60])
def test_the_marked_readme_commands_run(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.strip() or any(tmp_path.iterdir()), "the command printed and wrote nothing"


def test_the_checks_catch_a_removed_or_abbreviated_option():
    """The two checks above fail on what they must: an option no subcommand has, an abbreviation, a bad value."""
    argv = ["invert", "photos/", "--generator", "G.pt", "--encoder", "E.pt", "--out", "run/"]
    assert parse_error(argv) is None and not unknown_options(argv, command_parser(argv)[1])
    removed = [*argv, "--no-such-option", "1"]
    assert parse_error(removed) and unknown_options(removed, command_parser(removed)[1]) == ["--no-such-option"]
    abbreviated = [*argv[:-2], "--ou", "run/"]  # argparse takes it for --out: the exact check does not
    assert parse_error(abbreviated) is None and unknown_options(abbreviated, command_parser(abbreviated)[1])
    assert "required" in parse_error(argv[:-2])  # no --out
    assert "invalid choice" in parse_error([*argv, "--progress", "sometimes"])


def span_problems(argv: list[str]) -> list[str]:
    """What is wrong with a partial command line quoted in prose: its subcommand and its option names."""
    try:
        path, parser = command_parser(argv)
    except AssertionError as e:
        return [str(e)]
    return [f"`cycle-encoding {' '.join(path)}` has no option {o}" for o in unknown_options(argv, parser)]


def test_the_feature_table_names_real_commands():
    """The command column of "Where each feature lives": subcommands with their options, scripts that exist."""
    section = README_TEXT.split("## Where each feature lives", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[2] for line in section.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) >= 20, rows
    subcommands = set(_subparsers(build_parser()))
    problems = []
    for cell in rows:
        for span in re.findall(r"`([^`]+)`", cell):
            words = shlex.split(span)
            if words[0] in subcommands:
                problems += span_problems(words)
            elif words[0].startswith("--"):
                problems += (
                    [] if any(span_problems([s, *words]) == [] for s in subcommands) else [f"no command has {span}"]
                )
            elif words[0].startswith("cycle_encoding."):
                obj = cycle_encoding
                for name in words[0].split(".")[1:]:
                    obj = getattr(obj, name, None)
                problems += [] if obj is not None else [f"`{span}`: the package has no such name"]
            elif words[0] == "python" or words[0].startswith("scripts/"):
                target = words[-1] if words[0] == "python" else words[0]
                problems += [] if (ROOT / target).exists() else [f"{target}: no such file"]
            else:
                problems.append(f"`{span}`: not a command this test knows")
    assert not problems, problems


def package_names_used(code: str) -> list[list[str]]:
    """The attribute chains of the package a Python snippet uses: ``ce.a.b`` after ``import cycle_encoding as ce``,
    and ``X`` after ``from cycle_encoding import X``."""
    tree = ast.parse(code)
    aliases, used = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname or a.name for a in node.names if a.name == "cycle_encoding"}
        elif isinstance(node, ast.ImportFrom) and node.module == "cycle_encoding":
            used += [[a.name] for a in node.names]
    for node in ast.walk(tree):
        chain = []
        while isinstance(node, ast.Attribute):
            chain.insert(0, node.attr)
            node = node.value
        if chain and isinstance(node, ast.Name) and node.id in aliases:
            used.append(chain)
    return used


def missing_name(chain: list[str]) -> str | None:
    obj = cycle_encoding
    for i, name in enumerate(chain):
        if not isinstance(obj, types.ModuleType):
            return None  # attributes of a function's or class's result are not checked
        if not hasattr(obj, name):
            return ".".join(chain[: i + 1])
        obj = getattr(obj, name)
    return None


@pytest.mark.parametrize("md", [README, *DOCS], ids=lambda p: p.name)
def test_python_snippets_use_names_the_package_has(md):
    blocks = re.findall(r"^```python\n(.*?)^```", md.read_text(encoding="utf-8"), flags=re.S | re.M)
    used = [chain for block in blocks for chain in package_names_used(block)]
    assert used or not blocks, "a snippet that uses nothing of the package"
    assert not [m for chain in used if (m := missing_name(chain))]


def test_the_snippet_check_finds_a_missing_name():
    code = (
        "import cycle_encoding as ce\nfrom cycle_encoding import Editor\nce.load_generator('G.pt').mapping\nce.nope()"
    )
    used = package_names_used(code)
    assert ["Editor"] in used and ["load_generator"] in used  # what a call returns is not followed
    assert [missing_name(c) for c in used if missing_name(c)] == ["nope"]


@pytest.mark.parametrize("md", [README, *DOCS], ids=lambda p: p.name)
def test_inline_commands_and_paths_exist(md):
    prose = without_code_blocks(md.read_text(encoding="utf-8"))
    problems = []
    for span in re.findall(r"`(cycle-encoding [^`]+)`", prose):
        problems += span_problems(package_argv(shlex.split(span)))
    for span in re.findall(r"`((?:src|scripts|benchmarks|tests|docs|examples)/[\w./*-]+)`", prose):
        if not glob.glob(str(ROOT / span)):
            problems.append(f"`{span}`: no such file")
    assert not problems, problems


@pytest.mark.parametrize("md", [README, *DOCS], ids=lambda p: p.name)
def test_relative_links_lead_to_files_and_headings(md):
    problems = []
    for target in links(md):
        if re.match(r"[a-z]+:", target):
            continue  # http:, https:, mailto:
        file, _, anchor = target.partition("#")
        dest = (md.parent / file).resolve() if file else md
        if not dest.exists():
            problems.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{target}: no heading with that anchor in {dest.name}")
    assert not problems, problems


def test_github_anchors():
    """The anchor rule on headings of the kinds these pages use (as GitHub renders them)."""
    assert github_anchor("Faces with your files") == "faces-with-your-files"
    assert github_anchor("Speed options: `--precision`, `--tune-batch`") == "speed-options---precision---tune-batch"
    assert github_anchor("Train an encoder (the cycle schedule)") == "train-an-encoder-the-cycle-schedule"
    assert github_anchor("W and Cycle to 48,000 steps") == "w-and-cycle-to-48000-steps"
