"""The README is the front door: every command, setting, variable and endpoint is in it."""

import argparse
import os
import re

from conftest import ROOT
from fmedge.cli import build_parser
from fmedge.config import FIELDS

README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


def subcommands(parser, prefix="fm-edge"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{prefix} {name}"
                yield from subcommands(sub, f"{prefix} {name}")


def test_every_cli_command_is_documented():
    missing = [c for c in subcommands(build_parser())
               if c not in README and c.replace("fm-edge models ", "") not in README]
    assert missing == []


def test_every_setting_and_env_var_is_documented():
    for spec in FIELDS:
        assert f"`{spec.name}`" in README, spec.name
        assert f"`{spec.env_var}`" in README, spec.env_var
    assert "`OLLAMA_HOST`" in README


def test_every_endpoint_is_documented():
    from fmedge.openapi import openapi_document

    for path in openapi_document("test")["paths"]:
        documented = re.sub(r"\{[^}]+\}", "{", path)
        assert any(re.sub(r"\{[^}]+\}", "{", p) == documented
                   for p in re.findall(r"`(?:GET|POST) (/[^` ?]*)", README)), path


def test_the_two_setup_commands_are_there():
    assert "python3 build_pyz.py && python3 -I fm-edge.pyz" in README
    assert "bash tools/run_tests.sh" in README
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    assert "tools/run_tests.sh" in ci
