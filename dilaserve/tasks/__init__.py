"""Tasks with exactly checkable answers: the data the embedded model is trained and measured on.

``get_task(name)`` returns a task object with ``make_example(rng)``, ``examples(split, num,
seed)``, ``score(completion, example)`` and ``pad_prompt(...)``; ``TASKS`` names them all.
"""

from __future__ import annotations

from dilaserve.tasks.arithmetic import ArithmeticTask, Example, extract_answer

TASKS: dict[str, ArithmeticTask] = {
    "arith": ArithmeticTask(name="arith"),
}


def get_task(name: str) -> ArithmeticTask:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}") from None


__all__ = ["TASKS", "ArithmeticTask", "Example", "extract_answer", "get_task"]
