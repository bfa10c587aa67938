"""`relibra launch`: accelerate's launcher, with a ``relibra:`` section allowed in its config.

Accelerate rejects unknown top-level keys in its config YAML. ``relibra launch`` reads the
file given by ``--config_file``, takes out the top-level ``relibra:`` section, writes the rest
to a clean temporary accelerate config and the section to a temporary relibra YAML, points
``RELIBRA_CONFIG`` at the latter (every rank inherits it; :class:`RelibraPlugin` reads it), and
runs ``accelerate launch`` with every other argument unchanged::

    relibra launch --config_file examples/accelerate_cpu.yaml examples/grpo_tiny_moe.py --steps 3
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from typing import Iterator, Optional, Sequence

from .plugin import CONFIG_ENV, RelibraPlugin

__all__ = ["main", "split_config", "rewrite_argv", "validate_section"]


def split_config(path: str) -> tuple[dict, Optional[dict]]:
    """Read an accelerate config YAML; return ``(accelerate_part, relibra_section or None)``.

    Raises ValueError naming the file when it is missing, not YAML, not a mapping, or when its
    ``relibra:`` section is not a mapping.
    """
    import yaml

    if not os.path.isfile(path):
        raise ValueError(f"relibra launch: config file {path!r} does not exist")
    with open(path, encoding="utf-8") as fh:
        try:
            data = yaml.safe_load(fh)
        except yaml.YAMLError as exc:
            raise ValueError(f"relibra launch: config file {path!r} is not valid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"relibra launch: config file {path!r} must hold a mapping, got {type(data).__name__}")
    section = data.pop("relibra", None)
    if section is not None and not isinstance(section, dict):
        raise ValueError(f"relibra launch: the 'relibra:' section of {path!r} must be a mapping, got {section!r}")
    return data, section


def validate_section(path: str) -> None:
    """Check the ``relibra:`` section of ``path`` as every rank will read it, before any rank starts.

    Raises one ValueError naming the user's file and the key (unknown keys, wrong types, bad
    values, an unknown policy or an option it does not take; :func:`relibra.config.load_config`).
    """
    from relibra.config import load_config

    try:
        load_config(path, section="relibra")
    except ValueError as exc:
        raise ValueError(f"relibra launch: invalid 'relibra:' section in {path}: {exc}") from None


def _find_config_file(argv: Sequence[str]) -> tuple[Optional[int], Optional[str]]:
    """Index and value of ``--config_file`` among the launcher's own arguments (before the script)."""
    for i, arg in enumerate(argv):
        if arg in ("--config_file", "--config-file"):
            if i + 1 >= len(argv):
                raise ValueError("relibra launch: --config_file needs a path")
            return i, argv[i + 1]
        if arg.startswith("--config_file=") or arg.startswith("--config-file="):
            return i, arg.split("=", 1)[1]
        if arg.endswith(".py") and not arg.startswith("-"):
            break  # the training script: what follows belongs to it
    return None, None


@contextlib.contextmanager
def rewrite_argv(argv: Sequence[str]) -> Iterator[tuple[list[str], dict[str, str]]]:
    """Yield ``(accelerate argv, extra env)``; temporary files live until the block ends.

    Without ``--config_file`` or without a ``relibra:`` section, argv comes back unchanged.
    """
    import yaml

    argv = list(argv)
    idx, path = _find_config_file(argv)
    if path is None:
        yield argv, {}
        return
    accel, section = split_config(path)
    if section is None:
        yield argv, {}
        return
    validate_section(path)
    with tempfile.TemporaryDirectory(prefix="relibra_launch_") as tmp:
        accel_path = os.path.join(tmp, "accelerate_config.yaml")
        relibra_path = os.path.join(tmp, "relibra.yaml")
        with open(accel_path, "w", encoding="utf-8") as fh:
            yaml.safe_dump(accel, fh, sort_keys=False)
        with open(relibra_path, "w", encoding="utf-8") as fh:
            yaml.safe_dump(section, fh, sort_keys=False)
        if argv[idx].startswith("--config"):
            if "=" in argv[idx]:
                argv[idx] = "--config_file=" + accel_path
            else:
                argv[idx + 1] = accel_path
        yield argv, {CONFIG_ENV: relibra_path}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry of ``relibra launch [accelerate launch args] script.py [script args]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from accelerate.commands.launch import launch_command, launch_command_parser

    parser = launch_command_parser()
    parser.prog = "relibra launch"
    with contextlib.ExitStack() as stack:
        try:  # bad settings: one message here, before any rank starts
            new_argv, env = stack.enter_context(rewrite_argv(argv))
            stack.enter_context(_environment(env))
            RelibraPlugin()  # the settings as every rank will read them (file and RELIBRA_* variables)
        except ValueError as exc:
            text = str(exc)
            print(text if text.startswith("relibra launch") else f"relibra launch: {text}", file=sys.stderr)
            return 2
        launch_command(parser.parse_args(new_argv))
    return 0


@contextlib.contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    """``os.environ`` updated with ``env`` for the block (the launched ranks inherit it)."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
