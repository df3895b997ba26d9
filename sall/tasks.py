"""The three grading tasks of the paper: their number of grades and the grade names."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskSpec:
    name: str
    grades: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.grades)


TASKS: dict[str, TaskSpec] = {
    "dr": TaskSpec("dr", ("normal", "NPDR-I (mild)", "NPDR-II (moderate)", "NPDR-III (severe)", "PDR")),
    "amd": TaskSpec("amd", ("normal", "small drusen", "big drusen / dry", "CNV / wet")),
    "arter": TaskSpec("arter", ("normal", "arteriosclerosis")),
}

ALL_TASKS: tuple[str, ...] = tuple(TASKS)
