"""Every TOML block in the README loads as printed (router and agent configs).

The key file the blocks name (/etc/arr/secret) is the one thing swapped: for
a temporary file holding a key, as an operator would create it."""

from __future__ import annotations

import re
import secrets
from pathlib import Path

import pytest

from arr.config import load_config
from handoff.agent import load_agent_config

README = Path(__file__).resolve().parents[2] / "README.md"


def toml_blocks() -> list[str]:
    return re.findall(r"```toml\n(.*?)```", README.read_text(), re.S)


def test_the_readme_has_router_and_agent_blocks():
    blocks = toml_blocks()
    assert any("[router]" in b for b in blocks) and any("[agent]" in b for b in blocks)


@pytest.mark.parametrize("index", range(len(toml_blocks())))
def test_a_readme_config_block_loads(index, tmp_path):
    secret = tmp_path / "secret"
    secret.touch(mode=0o600)
    secret.write_text(secrets.token_hex(32) + "\n")
    block = toml_blocks()[index].replace("/etc/arr/secret", str(secret))
    path = tmp_path / "config.toml"
    path.write_text(block)
    if "[agent]" in block:
        settings = load_agent_config(path)
        assert settings.secret_file == str(secret)
    elif "[router]" in block or "[[targets]]" in block or "[pools." in block:
        load_config(path)
    else:
        pytest.fail(f"README TOML block {index} is neither a router nor an agent config:\n{block}")


def readme_commands() -> list[str]:
    """Every `arr ...` line of the README's sh blocks, comments stripped."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", README.read_text(), re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("arr "):
                commands.append(line)
    return commands


def test_every_readme_arr_command_is_accepted_by_the_cli():
    import shlex

    from arr.cli import build_parser

    commands = readme_commands()
    assert len(commands) >= 15
    parser = build_parser()
    for line in commands:
        argv = shlex.split(line)[1:]
        if argv[0] == "bench":
            continue  # its arguments go to the harness (arr bench --help)
        if argv == ["--version"]:
            continue
        try:
            parser.parse_args(argv)
        except SystemExit as exc:
            pytest.fail(f"README command {line!r} is refused by the CLI ({exc})")


def test_check_config_accepts_the_readme_blocks_as_printed(tmp_path, capsys):
    from arr.cli import main

    secret = tmp_path / "secret"
    secret.touch(mode=0o600)
    secret.write_text(secrets.token_hex(32) + "\n")
    for index, block in enumerate(toml_blocks()):
        path = tmp_path / f"block{index}.toml"
        path.write_text(block.replace("/etc/arr/secret", str(secret)))
        assert main(["check-config", str(path)]) == 0, capsys.readouterr().err
        assert ": ok (" in capsys.readouterr().out
