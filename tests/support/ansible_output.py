"""Reading ansible-playbook's default (text) output, for the provisioning and system tests."""

from __future__ import annotations

import re


def changed_tasks(output: str) -> list[str]:
    """Names of the tasks and handlers a play reports (or, under --check, predicts) as changed."""
    names: list[str] = []
    task = ""
    for line in output.splitlines():
        head = re.match(r"(?:TASK|RUNNING HANDLER) \[(?:[^\]]* : )?(.*?)\]", line)
        if head:
            task = head.group(1)
        elif line.startswith("changed:") and task and task not in names:
            names.append(task)
    return names
