"""The arr command's own behaviour: --version, options after the subcommand,
check-config on router and agent configs, one-line errors."""

from __future__ import annotations

import secrets
import socket

import pytest

from arr.cli import build_parser, main


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("arr ")


def test_log_level_before_or_after_the_subcommand():
    parser = build_parser()
    assert parser.parse_args(["--log-level", "debug", "conns"]).log_level == "debug"
    assert parser.parse_args(["conns", "--log-level", "warning"]).log_level == "warning"
    assert not hasattr(parser.parse_args(["conns"]), "log_level")  # main() defaults it to info


def key_file(tmp_path, content: str | None = None):
    path = tmp_path / "secret"
    path.touch(mode=0o600)
    path.write_text(secrets.token_hex(32) if content is None else content)
    return path


@pytest.mark.parametrize("text,error", [
    ("", "the file is empty"),
    ('[router]\nmode = "nat"\nsecret_file = "/nonexistent/k"\n[[targets]]\naddress = "10.0.0.1:80"\n'
     'agent = "10.0.0.1:7070"\n', "router.secret_file: control key file '/nonexistent/k' does not exist"),
    ('[agent]\nlisten = "10.0.0.1:7070"\nsecret_file = "/nonexistent/k"\n',
     "agent.secret_file: control key file '/nonexistent/k' does not exist"),
    ('[agent]\nlisten = "10.0.0.1:7070"\nsecret_file = "@KEY@"\n', "too short"),
])
def test_check_config_errors_are_one_line(tmp_path, capsys, text, error):
    path = tmp_path / "c.toml"
    path.write_text(text.replace("@KEY@", str(key_file(tmp_path, "abc"))))
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert error in err and err.count("\n") == 1 and "Traceback" not in err


def test_check_config_of_an_agent(tmp_path, capsys):
    path = tmp_path / "agent.toml"
    path.write_text(f'[agent]\nlisten = "10.0.0.1:7070"\nsecret_file = "{key_file(tmp_path)}"\n')
    assert main(["check-config", str(path)]) == 0
    assert "ok (agent, listen 10.0.0.1:7070)" in capsys.readouterr().out


def test_a_router_port_in_use_is_one_line(tmp_path, capsys):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    path = tmp_path / "r.toml"
    path.write_text(f'[router]\nlisten = "127.0.0.1:{port}"\nmode = "proxy"\nadmin_socket = ""\n'
                    '[[targets]]\naddress = "127.0.0.1:9"\n')
    try:
        assert main(["serve", "--config", str(path)]) == 1
    finally:
        taken.close()
    err = capsys.readouterr().err
    assert "arr serve: cannot start: Address already in use" in err and "Traceback" not in err
