"""YAML config files for a command's flags.

- ``--config FILE.yaml``: a mapping of flag names to values (``batch-size: 256`` or
  ``batch_size: 256``); flags given on the command line override it. Each value is checked by the
  parser's own type function and choices, exactly as the flag would be, and a key that is no flag
  of the command is refused: both end in one ``error:`` line naming the key.
- ``resolved_config``: the run's flags after parsing, as YAML that ``--config`` reads back (the
  train command writes it into every output folder as ``config.yaml``).
- ``--print-config``: print that YAML and exit.

The parser is the single declaration of every flag: nothing here lists flags by hand.
"""
from __future__ import annotations

import argparse
import difflib
import os
import tempfile
from collections.abc import Hashable
from typing import Dict, Iterable, Optional

CONFIG_FILE = "config.yaml"
# flags that say how to read the config or what to do this time, not what the run is
NOT_CONFIG = {"help", "config", "print_config"}


def add_config_flags(p: argparse.ArgumentParser) -> None:
    from tec_fast.cli.flags import existing_file

    g = p.add_argument_group("config file")
    g.add_argument("--config", metavar="FILE.yaml", type=existing_file,
                   help="read flags from this YAML file (keys: flag names, '-' or '_'); flags on the "
                        f"command line override it. Every run writes DIR/{CONFIG_FILE}, which reruns it")
    g.add_argument("--print-config", action="store_true",
                   help="print the resolved config (file + command line + defaults) as YAML and exit")


def _yaml():
    try:
        import yaml
    except ImportError:  # a dependency of the package; only a broken install lacks it
        raise ValueError("--config needs PyYAML (pip install pyyaml)") from None
    return yaml


def _unique_key_loader(yaml, path: str):
    """A SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last value
    silently, which would drop the first without a word)."""
    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if not isinstance(key, Hashable):
                    continue  # the base class refuses it with its own message
                if key in seen:
                    raise ValueError(f"--config {path}: key {key!r} is given twice "
                                     f"(line {key_node.start_mark.line + 1})")
                seen.add(key)
            return super().construct_mapping(node, deep=deep)
    return Loader


def read_config(path: str) -> dict:
    """The mapping in a YAML file (an empty file is an empty mapping); UTF-8 text, each key once."""
    yaml = _yaml()
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"--config {path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
                         f"{exc.start}); save the file as UTF-8") from None
    try:
        data = yaml.load(text, Loader=_unique_key_loader(yaml, path))
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" (line {where.line + 1})" if where is not None else ""
        raise ValueError(f"--config {path}: not valid YAML{at}: {getattr(exc, 'problem', None) or exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of flag names to values, got a "
                         f"{type(data).__name__}")
    return data


def _flag_actions(p: argparse.ArgumentParser) -> Dict[str, argparse.Action]:
    return {a.dest: a for a in p._actions if a.option_strings and a.dest not in NOT_CONFIG}


def config_values(p: argparse.ArgumentParser, data: dict, source: str) -> dict:
    """``{dest: value}`` from a config mapping, each value converted and checked as its flag's
    command-line text would be. Raises ValueError naming the key."""
    actions, out = _flag_actions(p), {}
    for key, value in data.items():
        dest = str(key).lstrip("-").replace("-", "_")
        action = actions.get(dest)
        if action is None and dest in NOT_CONFIG:
            raise ValueError(f"{source}: key {key!r}: --{dest.replace('_', '-')} belongs on the command line, "
                             f"not in a config file")
        if action is None:
            close = difflib.get_close_matches(dest, list(actions), n=1)
            # in the spelling the file used: dashes as the flags (and config.yaml) have them, or underscores
            spell = (lambda d: d) if "_" in str(key) else (lambda d: d.replace("_", "-"))
            hint = f"; did you mean {spell(close[0])!r}?" if close else ""
            raise ValueError(f"{source}: unknown key {key!r}: not a flag of {p.prog}{hint}")
        if dest in out:
            raise ValueError(f"{source}: key {key!r}: {action.option_strings[0]} is given twice")
        out[dest] = _convert(p, action, key, value, source)
    return out


def _convert(p, action: argparse.Action, key, value, source: str):
    flag = action.option_strings[0]
    is_switch = action.nargs == 0  # store_true / store_false
    if value is None:
        if action.default is None:
            return None
        raise ValueError(f"{source}: key {key!r} ({flag}): null is only allowed for a flag without a default")
    if is_switch:
        if not isinstance(value, bool):
            raise ValueError(f"{source}: key {key!r} ({flag}): expected true or false, got {value!r}")
        return value  # the key is the attribute: `no_progress: true` as --no-progress
    if value is True and action.nargs == "?":  # a flag that may stand bare (--resume): true means bare
        return action.const
    if isinstance(value, bool) or isinstance(value, (list, dict)):
        raise ValueError(f"{source}: key {key!r} ({flag}): expected one value as the flag takes, got {value!r}")
    try:
        return p._get_values(action, [str(value)])  # the flag's own type function and choices
    except argparse.ArgumentError as exc:
        raise ValueError(f"{source}: key {key!r} ({flag}): {exc.message}") from None


def parse_with_config(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse ``argv``; with ``--config FILE`` its values become the parser's defaults and
    ``argv`` is parsed again, so the command line wins. A bad file is ``p.error`` (exit 2)."""
    args = p.parse_args(argv)
    if getattr(args, "config", None):
        try:
            values = config_values(p, read_config(args.config), f"--config {args.config}")
        except ValueError as exc:
            p.error(str(exc))
        p.set_defaults(**values)
        args = p.parse_args(argv)
    return args


def _yaml_value(value):
    """A value in the form its flag's type reads back (a mask-ratio range is 'LO:HI')."""
    if isinstance(value, tuple):
        return ":".join(str(v) for v in value)
    return value


def resolved_config(p: argparse.ArgumentParser, args: argparse.Namespace,
                    keep: Optional[Iterable[str]] = None, skip: Iterable[str] = (),
                    header: str = "") -> str:
    """YAML of every flag's value in ``args``, grouped and ordered as ``--help`` shows them
    (``keep``: only these dests; ``skip``: not these)."""
    yaml = _yaml()
    keep = set(keep) if keep is not None else None
    skip = set(skip) | NOT_CONFIG
    lines = [f"# {line}" for line in header.splitlines()]
    for group in p._action_groups:
        rows = [a for a in group._group_actions if a.option_strings and a.dest not in skip
                and (keep is None or a.dest in keep) and hasattr(args, a.dest)]
        if not rows:
            continue
        lines.append(f"# {group.title}")
        for a in rows:
            lines.append(yaml.safe_dump({a.dest: _yaml_value(getattr(args, a.dest))},
                                        default_flow_style=False, sort_keys=False).rstrip("\n"))
    return "\n".join(lines) + "\n"


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``."""
    from tec_fast.checkpoint.io import current_umask

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # what open() would have given it (mkstemp makes 0600)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
