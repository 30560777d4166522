"""Every ``fedlora`` command in the README is a command the CLI takes, as written.

Commands of ``fedlora``'s own parser (simulate, evaluate, predict, privacy plan) are parsed in
full; delegated ones (privacy audit, certs, site key/status/check) must name a subcommand that
exists and only options its ``--help`` lists. Every ``--set KEY=...`` is a run-config key, and
the README's central-DP command builds a strategy. (The loading snippets run in
``tests/test_saved_adapter.py``; the main job and the test command are what CI runs.)
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from fedlora.cli import build_parser, main, resolve_simulation
from fedlora.run_config import default_run_config
from simulations.attacks import ATTACK_KEYS

README = Path(__file__).resolve().parents[1] / "README.md"
DELEGATED = {("privacy", "audit"), ("certs",), ("site", "key"), ("site", "status"), ("site", "check")}


def readme_commands() -> list[list[str]]:
    """Each ``fedlora ...`` line of the README's bash blocks (continuations joined, comments and
    the set-up chain's leading ``... &&`` dropped), as argv after ``fedlora``."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            code = line.split(" #", 1)[0].strip()
            if "fedlora " not in code or code.startswith(("python", "#")) and "&& fedlora" not in code:
                continue
            argv = shlex.split(code[code.index("fedlora ") :])[1:]
            commands.append(argv)
    return commands


COMMANDS = readme_commands()


def test_the_readme_has_the_commands_a_user_needs():
    named = {" ".join(argv[:2]) for argv in COMMANDS}
    for expected in ("simulate", "evaluate --adapter", "predict --adapter", "privacy audit", "privacy plan"):
        assert any(name.startswith(expected.split()[0]) for name in named), expected
    assert len(COMMANDS) >= 10


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(argv)[:60] for argv in COMMANDS])
def test_each_readme_command_is_one_the_cli_takes(argv, capsys):
    words = tuple(word for word in argv[:2] if not word.startswith("-"))
    delegated = next((d for d in DELEGATED if words[: len(d)] == d), None)
    if delegated is None:
        args = build_parser().parse_args(argv)  # exits (SystemExit) on an unknown option
        if args.command == "simulate" and not args.resume:
            resolve_simulation(args)  # every --set key exists, and the combination is accepted
        return
    with pytest.raises(SystemExit) as done:
        main([*delegated, "--help"])
    assert done.value.code == 0
    listed = capsys.readouterr().out
    for option in (word.split("=")[0] for word in argv if word.startswith("--")):
        assert option in listed, f"{' '.join(argv)}: {option} is not an option of fedlora {' '.join(delegated)}"


def test_every_set_key_the_readme_names_is_a_run_config_key():
    keys = set(re.findall(r"--set ([\w-]+)=", README.read_text())) - {"key"}  # `--set key=value`: the form
    unknown = keys - set(default_run_config()) - set(ATTACK_KEYS)
    assert len(keys) > 5 and not unknown, unknown


def test_the_readme_central_dp_command_builds_its_strategy():
    from strategies.factory import build_strategy

    (argv,) = [a for a in COMMANDS if "central-dp=true" in a]
    settings, _ = resolve_simulation(build_parser().parse_args(argv))
    assert build_strategy(settings).central_dp is not None
