"""Running a `softvq-fast` subcommand that must fail, for the bad-input tests."""
from __future__ import annotations

import pytest

from softvq_fast import cli


def cli_error(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """The one-line error of a command that must fail: SystemExit's message, or argparse's own
    (exit status 2, printed after the usage line)."""
    with pytest.raises(SystemExit) as failure:
        cli.main(argv)
    code = failure.value.code
    if isinstance(code, str):
        assert "\n" not in code, code
        return code
    assert code == 2, code
    return capsys.readouterr().err.strip().splitlines()[-1].split(" error: ", 1)[1]
