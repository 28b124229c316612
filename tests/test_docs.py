"""The documentation keeps up with the code: commands, exit codes, options, threat model, links."""

from __future__ import annotations

import argparse
import itertools
import re
from pathlib import Path

import pytest

from encfs_cloud import errors
from encfs_cloud.cli import main as cli_main

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAN = ROOT / "docs" / "man" / "encfs-cloud.1"
MOUNT_MAN = ROOT / "docs" / "man" / "mount.encfs-cloud.1"
SECURITY = ROOT / "docs" / "security.md"
DOCS = [README, ROOT / "docs" / "design.md", ROOT / "docs" / "format.md", SECURITY]

# Each attack class docs/security.md must say how it is detected (matched case-insensitively).
ATTACK_CLASSES = [
    "bit flip",
    "swap",
    "replay",
    "old chunk version",
    "truncation",
    "deleted object",
    "commit removal",
    "reorder",
    "rollback",
    "header",
    "keyring",
    "record edit",
    "key substitution",
    "key_check",
    "lease forgery",
]
ADVERSARIES = ["bucket owner", "network attacker", "thief", "revoked device", "out of scope"]


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _exit_codes() -> list[int]:
    """Every code a command can exit with that has a meaning of its own."""
    assert (errors.EXIT_REPAIRED, errors.EXIT_DAMAGED, errors.EXIT_SOME_LOST) == (30, 31, 32)
    extra = [errors.EXIT_REPAIRED, errors.EXIT_DAMAGED, errors.EXIT_SOME_LOST, 130]
    return sorted({*errors.EXIT_CODES.values(), *extra})


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update(action.choices)
    return found


def _commands() -> list[str]:
    """'init', 'mount', …, and 'device list', 'device approve', … as a user types them."""
    names = []
    for name, sub in _subparsers(cli_main.build_parser()).items():
        names.append(name)
        names += [f"{name} {action}" for action in _subparsers(sub)]
    return names


def _man_section(text: str, title: str) -> str:
    found = re.search(rf"^\.SH {re.escape(title)}\n(.*?)(?=^\.SH |\Z)", text, re.M | re.S)
    assert found, f"no .SH {title} section"
    return found.group(1)


def _roff_plain(line: str) -> str:
    """A .B/.BI/.BR line as the words it shows: macro, quotes and escapes dropped."""
    line = re.sub(r"^\.[A-Z]+\s*", "", line)
    return re.sub(r"\s+", " ", line.replace("\\-", "-").replace('"', "")).strip()


# --- README ---------------------------------------------------------------------------------


def test_readme_starts_with_make_demo_and_make_test() -> None:
    text = _text(README)
    first_block = re.search(r"```sh\n(.*?)```", text, re.S)
    assert first_block, "README has no sh code block"
    lines = [line.split("#")[0].strip() for line in first_block.group(1).splitlines()]
    assert lines[:2] == ["make demo", "make test"]
    assert text.index("make demo") < text.index("## Using it")


@pytest.mark.parametrize("code", _exit_codes())
def test_every_exit_code_in_readme_table(code: int) -> None:
    assert re.search(rf"^\|\s*{code}\s*\|", _text(README), re.M), f"exit code {code}"


@pytest.mark.parametrize("code", _exit_codes())
def test_every_exit_code_in_man_page(code: int) -> None:
    status = _man_section(_text(MAN), "EXIT STATUS")
    assert re.search(rf"^\.B {code}$", status, re.M), f"exit code {code}"


def test_exit_code_tables_have_no_stale_rows() -> None:
    """A code that the docs list but nothing raises any more is as wrong as a missing one."""
    known = {0, 1, *_exit_codes()}
    table = re.findall(r"^\|\s*(\d+)\s*\|", _text(README), re.M)
    assert {int(c) for c in table} <= known
    man = re.findall(r"^\.B (\d+)$", _man_section(_text(MAN), "EXIT STATUS"), re.M)
    assert {int(c) for c in man} <= known


@pytest.mark.parametrize("command", _commands())
def test_every_subcommand_in_readme(command: str) -> None:
    assert f"encfs-cloud {command}" in _text(README), command


@pytest.mark.parametrize("command", _commands())
def test_every_subcommand_in_man_page(command: str) -> None:
    lines = _man_section(_text(MAN), "COMMANDS").splitlines()
    # A command is the tag of a .TP paragraph: the line right after `.TP`.
    shown = [_roff_plain(tag) for tp, tag in itertools.pairwise(lines) if tp == ".TP"]
    assert any(s == command or s.startswith(command + " ") for s in shown), command


def test_every_mount_option_in_readme_and_mount_man_page() -> None:
    mount = _subparsers(cli_main.build_parser())["mount"]
    help_text = next(a.help for a in mount._actions if "-o" in a.option_strings)
    assert help_text
    keys = [item.split("=")[0].strip() for item in help_text.split(",")]
    readme = _text(README)
    man = _man_section(_text(MOUNT_MAN), "MOUNT OPTIONS").replace("\\-", "-")
    for key in keys:
        assert f"`{key}" in readme, key
        assert re.search(rf"(?<![\w-]){re.escape(key)}(?![\w-])", man), key


def test_readme_has_the_bench_placeholder_and_links_security() -> None:
    text = _text(README)
    assert "<!-- bench-table -->" in text
    assert "make bench" in text
    assert "(docs/security.md)" in text


# --- docs/security.md -------------------------------------------------------------------------


def test_security_doc_names_every_adversary() -> None:
    text = _text(SECURITY).lower()
    missing = [a for a in ADVERSARIES if a not in text]
    assert not missing


def test_security_doc_covers_every_attack_class() -> None:
    text = _text(SECURITY).lower()
    missing = [a for a in ATTACK_CLASSES if a not in text]
    assert not missing


def test_security_doc_has_the_leak_table_and_the_key_diagram() -> None:
    text = _text(SECURITY)
    assert re.search(r"^\| sees \| does not see \|$", text, re.M)
    diagram = next(b for b in re.findall(r"```\n(.*?)```", text, re.S) if "Argon2id" in b)
    for node in ("X25519", "recovery", "chunk", "commit", "lease", "vault/header", "vault/keyring"):
        assert node in diagram, node


# --- links ------------------------------------------------------------------------------------


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve(doc: Path) -> None:
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", _text(doc)):
        if "://" in target:
            continue
        assert (doc.parent / target).exists(), f"{doc.name} links to missing {target}"
