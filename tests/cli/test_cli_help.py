"""Every finished command's --help: exits 0, shows examples, and the commands
that open a device spell their options the same way."""

from __future__ import annotations

import argparse
import re

import pytest

from pyvfio.cli import main
from pyvfio.drivers import edu as edu_driver

DEVICE_OPTIONS = ("--backend", "--vfio-user PATH", "--broker PATH", "--timeout SECONDS", "BDF")


def help_of(capsys: pytest.CaptureFixture[str], entry, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        entry(argv)
    assert exc.value.code == 0
    return capsys.readouterr().out


def test_info_help(capsys) -> None:
    text = help_of(capsys, main, ["info", "--help"])
    assert "examples:" in text
    assert "pyvfio info --vfio-user /tmp/edu.sock" in text
    assert "pyvfio info 0000:00:03.0" in text
    for opt in (*DEVICE_OPTIONS, "--json"):
        assert opt in text, opt


def test_serve_help(capsys) -> None:
    text = help_of(capsys, main, ["serve", "--help"])
    flat = " ".join(text.split())
    assert "edu: QEMU's edu teaching device (1234:11e8)" in flat
    assert "pyvfio serve edu --socket /tmp/edu.sock" in text
    assert "python -m pyvfio.drivers.edu --vfio-user /tmp/edu.sock" in text
    assert "Ctrl-C" in text and "--list" in text


def test_edu_driver_help(capsys) -> None:
    text = help_of(capsys, edu_driver.main, ["--help"])
    assert text.startswith("usage: python -m pyvfio.drivers.edu")
    assert "python -m pyvfio.drivers.edu --vfio-user /tmp/edu.sock" in text
    assert "exit status: 0 every step passed, 1 a step failed, 2" in text
    for opt in (*DEVICE_OPTIONS, "--json", "--interrupts KINDS", "--root DIR"):
        assert opt in text, opt


def test_info_and_edu_driver_share_device_option_help(capsys) -> None:
    """Same flags, same words: one definition (kernel.commands.add_device_arguments)."""
    def option_lines(text: str) -> dict[str, str]:
        opts = text.split("options:")[1].split("examples:")[0]
        out = {}
        for block in re.split(r"\n  (?=-)", opts):
            if not block.strip():
                continue
            name = block.split()[0].rstrip(",")
            out[name] = " ".join(block.split())
        return out

    info = option_lines(help_of(capsys, main, ["info", "--help"]))
    driver = option_lines(help_of(capsys, edu_driver.main, ["--help"]))
    for opt in ("--backend", "--vfio-user", "--broker", "--timeout"):
        assert info[opt] == driver[opt], opt


def test_description_lines_are_wrapped(capsys) -> None:
    for entry, argv in ((main, ["info", "--help"]), (main, ["serve", "--help"]),
                        (edu_driver.main, ["--help"])):
        text = help_of(capsys, entry, argv)
        assert max(len(line) for line in text.splitlines()) <= 100, argv


def test_serve_list(capsys) -> None:
    assert main(["serve", "--list"]) == 0
    assert capsys.readouterr().out.startswith("edu ")


def test_edu_driver_rejects_unknown_interrupt_kind(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        edu_driver.main(["--vfio-user", "/x", "--interrupts", "msi,msix"])
    assert exc.value.code == 2
    assert "unknown interrupt kind 'msix': use msi, intx" in capsys.readouterr().err


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    from pyvfio.cli import build_parser

    (action,) = [a for a in build_parser()._actions if a.dest == "command"]
    return dict(action.choices)


def test_every_subcommand_is_covered() -> None:
    assert set(_subcommands()) >= {"ls", "groups", "check", "bind", "restore", "info", "serve",
                                   "broker", "broker-open", "guest", "guest-kernel", "demo"}


@pytest.mark.parametrize("name", sorted(_subcommands()))
def test_every_subcommand_help_has_examples_and_exit_statuses(capsys, name: str) -> None:
    """From the parser itself, so a new subcommand without them fails here."""
    text = help_of(capsys, main, [name, "--help"])
    epilog = text.split("examples:", 1)
    assert len(epilog) == 2, f"{name}: no examples"
    examples = [line.split()[1] for line in epilog[1].splitlines()
                if line.startswith("  pyvfio ")]
    assert name in examples, f"{name}: no example runs `pyvfio {name}`"
    assert "exit status: " in epilog[1], f"{name}: no exit statuses"
    assert "--root DIR" in text  # the global option, after the subcommand too
    assert max(len(line) for line in text.splitlines()) <= 100, name


def test_top_level_help_says_global_options_may_follow(capsys) -> None:
    text = " ".join(help_of(capsys, main, ["--help"]).split())
    assert "Global options (--root) may also come after the command" in text
    assert "130 interrupted" in text


def test_every_subcommand_has_a_summary_in_the_top_level_help(capsys) -> None:
    """`pyvfio --help` lists each command with its one-line summary (the
    parser's ``help=``); a command registered without one shows a bare name."""
    from pyvfio.cli import build_parser

    (action,) = [a for a in build_parser()._actions if a.dest == "command"]
    summaries = {a.dest: a.help for a in action._choices_actions}
    assert set(summaries) == set(_subcommands())
    text = " ".join(help_of(capsys, main, ["--help"]).split())
    for name, summary in summaries.items():
        assert summary, f"{name}: no summary"
        assert " ".join(summary.split()) in text, name
    assert summaries["ls"] == ("list PCI devices (IDs, names, driver, IOMMU group), with lspci's "
                               "filters")
