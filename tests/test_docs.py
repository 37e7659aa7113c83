"""The docs cannot drift from the code: every relative link of README.md and docs/ leads to a file, every
module path they name exists, and every `cart ...` command they show parses as `cart` parses it, with
override keys that are settings."""

import dataclasses
import re
import shlex

import pytest

from cart import cli
from cart.config import Config
from conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
MODULE_PATH = re.compile(r"\bcart/[\w/]+\.py\b")
FENCE = re.compile(r"```(?:sh|bash|console)?\n(.*?)```", re.S)
INLINE = re.compile(r"`(cart [^`]+)`")
PROGRAM = re.compile(r"^(?:accelerate launch(?: --[\w-]+(?:[ =]\S+)?)* -m cart|python -m cart|cart)\s+(.*)$")
OPTIONAL = re.compile(r"\[([^\]]*)\]")


def page_id(path) -> str:
    return str(path.relative_to(ROOT))


def commands(text: str) -> list[str]:
    """The `cart` command lines of a page: lines of its shell blocks (continuations joined, comments cut) and
    inline code that starts with `cart ` and has arguments. A placeholder outside [optional] parts (`<stage>`,
    `...`, `a|b`, `--x/--no-x`) makes it prose about a command, not one (`python -m cart ...`)."""
    found = []
    for block in FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if PROGRAM.match(line) and not re.search(r"<|\.\.\.|\||/--", OPTIONAL.sub("", line)):
                found.append(line)
    for span in INLINE.findall(text):
        if len(span.split()) > 2 and not re.search(r"<|\.\.\.|\||/--", OPTIONAL.sub("", span)):
            found.append(span)
    return found


def variants(line: str) -> list[list[str]]:
    """argv lists for a command line: without its [optional] parts, and with each optional flag added."""
    rest = PROGRAM.match(line).group(1)
    bare = OPTIONAL.sub("", rest)
    argvs = [shlex.split(bare)]
    for optional in OPTIONAL.findall(rest):
        if optional.startswith("-"):
            argvs.append(shlex.split(bare) + shlex.split(optional))
    return argvs


def setting_keys(cls=Config, prefix="") -> set[str]:
    keys = set()
    for f in dataclasses.fields(cls):
        keys.add(prefix + f.name)
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            keys |= setting_keys(f.default_factory, f"{prefix}{f.name}.")
    return keys


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_relative_link_and_module_path_exists(page):
    text = page.read_text(encoding="utf-8")
    links = [t.split("#")[0] for t in LINK.findall(text) if not re.match(r"[a-z]+:|#", t)]
    missing = [t for t in links if t and not (page.parent / t).exists()]
    missing += [p for p in MODULE_PATH.findall(text) if not (ROOT / p).exists()]
    assert not missing, f"{page_id(page)} points at what does not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_command_shown_parses(page, capsys):
    keys = setting_keys()
    shown = commands(page.read_text(encoding="utf-8"))
    for line in shown:
        for argv in variants(line):
            try:
                args = cli.parse(argv)
            except SystemExit:
                pytest.fail(f"{page_id(page)}: `{line}` does not parse: {capsys.readouterr().err.strip()}")
            unknown = [o.split("=")[0] for o in getattr(args, "overrides", []) if o.split("=")[0] not in keys]
            assert not unknown, f"{page_id(page)}: `{line}` overrides no setting named {unknown}"


def test_the_docs_show_commands_and_the_check_catches_a_bad_one():
    """The check itself: the README shows the stages' commands, and a flag `cart` lacks is caught."""
    shown = commands((ROOT / "README.md").read_text(encoding="utf-8"))
    assert {line.split()[1] for line in shown} >= {"corpus", "embed", "ids", "train", "eval", "retrieve", "generate"}
    with pytest.raises(SystemExit):
        cli.parse(variants("cart retrieve --run x --no-such-flag q")[0])
    assert variants("cart corpus --config c.yaml [--on-bad skip] [--force]") == [
        ["corpus", "--config", "c.yaml"], ["corpus", "--config", "c.yaml", "--on-bad", "skip"],
        ["corpus", "--config", "c.yaml", "--force"]]
    assert "train.epochs" in setting_keys() and "train.epoch" not in setting_keys()
