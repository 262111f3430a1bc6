"""Write completions/taskctl.{bash,zsh,fish} from the CLI itself (`make completions`).

Typer writes each script (`_TASKCTL_COMPLETE=source_SHELL taskctl`); two fixes make the zsh one
work the way the README installs it, as `_taskctl` in a folder on `$fpath`: compinit registers a
file only when `#compdef` is its first line (typer starts with a blank line), and an autoloaded
file's body runs on the first TAB, so it must complete then, not only register itself.
tests/test_docs.py checks the committed scripts against this.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHELLS = ("bash", "zsh", "fish")
_ZSH_REGISTER = "compdef _taskctl_completion taskctl"
_ZSH_EITHER_WAY = """\
if [[ ${funcstack[1]} == _taskctl ]]; then
  _taskctl_completion "$@"  # autoloaded from $fpath by compinit: this is the first TAB
else
  compdef _taskctl_completion taskctl  # sourced
fi"""


def script(shell: str) -> str:
    """The completion script for `shell`, as it is committed."""
    taskctl = Path(sys.executable).parent / "taskctl"
    env = {**os.environ, "_TASKCTL_COMPLETE": f"source_{shell}"}
    text = subprocess.run(
        [str(taskctl)], env=env, capture_output=True, text=True, check=True
    ).stdout.lstrip("\n")
    if shell == "zsh":
        if _ZSH_REGISTER not in text:
            raise SystemExit("typer's zsh script changed: update completions/generate.py")
        text = text.replace(_ZSH_REGISTER, _ZSH_EITHER_WAY)
    return text


def main(folder: Path = HERE) -> int:
    for shell in SHELLS:
        (folder / f"taskctl.{shell}").write_text(script(shell))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE))
