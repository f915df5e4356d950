"""glibc's getopt_long as qemu-img drives it: resize and amend parse their own words with it."""

from __future__ import annotations

from collections.abc import Sequence


class GetoptError(Exception):
    """A command line getopt_long refuses, in qemu-img's words."""


def getopt_long(argv: Sequence[str], short: dict[str, bool],
                 long: dict[str, bool]) -> tuple[list[tuple[str, str]], list[str]]:
    """glibc's getopt_long as qemu-img drives it: ([(option, argument)], operands).

    Options and operands may come in any order and `--` ends the options; short options
    cluster (`-qf qcow2`, `-fqcow2`); a long one may be any unambiguous prefix and takes its
    argument as `--name=value` or in the next word. Options come back as `-f` / `--shrink`.
    """
    opts: list[tuple[str, str]] = []
    operands: list[str] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        i += 1
        if word == "--":
            operands.extend(argv[i:])
            break
        if not word.startswith("-") or word == "-":
            operands.append(word)
        elif word.startswith("--"):
            name, eq, value = word[2:].partition("=")
            matches = [n for n in long if n == name] or [n for n in long if n.startswith(name)]
            if len(matches) != 1 or (eq and not long[matches[0]]):
                raise GetoptError(f"unrecognized option '{word}'")
            if long[matches[0]] and not eq:
                if i == len(argv):
                    raise GetoptError(f"missing argument for option '{word}'")
                value, i = argv[i], i + 1
            opts.append((f"--{matches[0]}", value))
        else:
            for j, letter in enumerate(word[1:], 1):
                if letter not in short:
                    raise GetoptError(f"unrecognized option '{word}'")
                if not short[letter]:
                    opts.append((f"-{letter}", ""))
                    continue
                value = word[j + 1:]
                if not value:
                    if i == len(argv):
                        raise GetoptError(f"missing argument for option '{word}'")
                    value, i = argv[i], i + 1
                opts.append((f"-{letter}", value))
                break
    return opts, operands
