"""Multi-step experiments (quickstart, ablation) as a list of real command lines that resume.

Each step is the command a user would type (``train.py``, ``inject.py``, ...) plus the file whose
presence means it finished. A rerun skips finished steps, and the commands themselves resume inside a
step (``train.py --resume auto``, ``inject.py`` on the same folder), so an interrupted experiment
continues where it stopped.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cli_shell import UserError

REPO = Path(__file__).resolve().parents[1]


class StepFailed(UserError, RuntimeError):
    """A step's command exited with an error."""


@dataclass(frozen=True)
class Step:
    """One command of an experiment and the file that exists once it has finished."""

    title: str
    command: Sequence[str]  # argv after the Python interpreter
    done_when: Path

    def shell(self) -> str:
        """The command as one could paste it into a shell at the repository root."""
        return shlex.join(["python", *self.command])


def run_steps(steps: Sequence[Step], *, dry_run: bool = False) -> list[float]:
    """Run the unfinished steps in order, showing ``[i/n]`` headers; returns each step's wall seconds.

    A step whose ``done_when`` exists takes 0 s. Raises :class:`StepFailed` on the first failure.
    """
    seconds: list[float] = []
    for i, step in enumerate(steps, 1):
        head = f"[{i}/{len(steps)}] {step.title}"
        if step.done_when.exists():
            print(f"{head}: done already ({step.done_when})", flush=True)
            seconds.append(0.0)
            continue
        print(f"{head}\n    $ {step.shell()}", flush=True)
        if dry_run:
            seconds.append(0.0)
            continue
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, *step.command], cwd=REPO, check=False)
        if proc.returncode != 0:
            raise StepFailed(f"step {i} ({step.title}) failed with exit code {proc.returncode}: {step.shell()}")
        if not step.done_when.exists():
            raise StepFailed(f"step {i} ({step.title}) finished without writing {step.done_when}")
        seconds.append(time.perf_counter() - start)
        print(f"{head}: finished in {seconds[-1]:.0f} s", flush=True)
    return seconds
