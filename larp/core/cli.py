"""What every entry point's `--help` shares: the description's line breaks kept and each flag's default shown.

Imports nothing heavy (no torch), so an entry point that parses its flags before its other imports answers
`--help` at once.
"""
import argparse

TRUST_HELP = ("DANGEROUS: also load checkpoints, token caches and TorchScript detectors that hold more than tensors "
              "and plain data, or whose digest is unknown; such a file can run any code on this machine. Only for "
              "files from a source you trust (docs/security.md)")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """RawDescriptionHelpFormatter that ends each flag's help with its default: `(default: 16)`, `(default: off)`
    for a switch, `(required)`; a help text that already says its default (e.g. "default: the tokenizer's") is
    left as it is."""

    def _get_help_string(self, action):
        text = action.help or ""
        if not action.option_strings or action.default is argparse.SUPPRESS or "default" in text.lower():
            return text
        if action.required:
            return f"{text} (required)"
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return f"{text} (default: {'on' if action.default else 'off'})"
        if action.default is None or action.default == []:
            return f"{text} (default: none)"
        return f"{text} (default: %(default)s)"


def parser(description):
    """An ArgumentParser with the project's help formatter and `description` (the entry point's docstring)."""
    return argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
