"""Every `robustkit` command the README shows names a real command and real options.

The README's commands are read from its code (fenced blocks and inline code spans); for each
`robustkit SUB ...` the options written after it must appear in `robustkit SUB --help`, so a
renamed or removed option cannot leave the README teaching one that fails.
"""

from __future__ import annotations

import re
from functools import cache

from tests.conftest import REPO, run

FENCED = re.compile(r"```[a-z]*\n(.*?)```", re.DOTALL)
INLINE = re.compile(r"`([^`]+)`")
COMMAND = re.compile(r"\brobustkit (?:-- )?([a-z][a-z-]*)\b(.*)", re.DOTALL)
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z-]*")


def readme_code() -> list[str]:
    """The README's code: each fenced block's lines, then each inline span (joined across the
    line breaks that wrapping puts inside a span)."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    snippets: list[str] = []
    for block in FENCED.findall(readme):
        snippets += block.replace("\\\n", " ").splitlines()
    prose = FENCED.sub("", readme)
    snippets += [" ".join(span.split()) for span in INLINE.findall(prose)]
    return snippets


def readme_commands() -> list[tuple[str, list[str]]]:
    """(subcommand, options) for each `robustkit SUB …` in the README's code; `robustkit --x`
    (no subcommand) gives ("", ["--x"])."""
    commands = []
    for snippet in readme_code():
        code = snippet.split(" # ", 1)[0]
        if "import robustkit" in code:
            continue
        top = re.search(r"\brobustkit (--[a-z-]+)", code)
        if top:
            commands.append(("", [top.group(1)]))
            continue
        match = COMMAND.search(code)
        if match:
            commands.append((match.group(1), OPTION.findall(match.group(2))))
    return commands


def robustkit_help(*subcommand: str) -> str:
    result = run(*subcommand, "--help")
    assert result.returncode == 0, f"robustkit {' '.join(subcommand)} --help: {result.stderr}"
    return result.stdout


@cache
def help_options(subcommand: str) -> set[str]:
    return set(OPTION.findall(robustkit_help(*([subcommand] if subcommand else []))))


def subcommands() -> set[str]:
    """The names under "Commands:" in `robustkit --help`."""
    panel = robustkit_help().split("Commands:", 1)[1]
    return {line.split()[0] for line in panel.splitlines() if line.startswith("  ")}


def test_readme_shows_every_command() -> None:
    shown = {sub for sub, _ in readme_commands()}
    assert shown >= subcommands() | {""}, shown


def test_every_readme_command_and_option_exists() -> None:
    commands = readme_commands()
    assert len(commands) >= 30, commands  # the README shows dozens; fewer means the parse broke
    real = subcommands()
    unknown = []
    for subcommand, options in commands:
        if subcommand and subcommand not in real:
            unknown.append(f"robustkit {subcommand}")
            continue
        known = help_options(subcommand)
        unknown += [" ".join(["robustkit", subcommand, option]).replace("  ", " ")
                    for option in options if option not in known]
    assert not unknown, f"README shows what the CLI does not have: {sorted(set(unknown))}"


MODEL = re.compile(r"--model[ =](\S+)")


def test_every_readme_model_is_one_a_clone_has_or_the_users_own() -> None:
    """`--model` in the README names released weights that exist (`zoo:NAME`, a committed
    `reports/…/model.safetensors`) or the user's own network (`module:factory`); never weights
    that need a training run the README does not show first (`runs/…`)."""
    wrong = []
    for snippet in readme_code():
        for model in MODEL.findall(snippet.split(" # ", 1)[0]):
            if model.startswith("zoo:"):
                known = (REPO / "reports" / model[4:] / "model.safetensors").is_file()
            elif model.endswith((".safetensors", ".pt", ".pt2", ".torchscript")):
                known = (REPO / model).is_file() and not model.startswith("runs/")
            else:  # a module:factory of the user's, or a placeholder such as M
                known = ":" in model or model.isupper()
            if not known:
                wrong.append(model)
    assert not wrong, f"README attacks models a fresh clone lacks: {sorted(set(wrong))}"
