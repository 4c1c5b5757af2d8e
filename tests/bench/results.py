"""Measurements (every repetition and the median) and target rows."""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass
class Measurement:
    """One quantity measured ``repeat`` times; ``runs`` keeps each repetition's details."""

    name: str
    what: str
    unit: str
    values: list[float] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def median(self) -> float | None:
        return median(self.values)

    def as_dict(self) -> dict[str, Any]:
        return {
            "what": self.what,
            "unit": self.unit,
            "values": self.values,
            "median": self.median,
            "runs": self.runs,
            "errors": self.errors,
        }


@dataclass
class Target:
    id: str
    what: str
    value: float | None
    unit: str
    target: str
    #: Set for comparisons: the baseline's median and value / baseline.
    baseline: float | None = None
    ratio: float | None = None
    met: bool | None = None
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def ratio_row(
    row_id: str,
    what: str,
    subject: Measurement,
    baseline: Measurement,
    minimum: float | None,
    note: str = "",
    *,
    maximum: float | None = None,
) -> Target:
    """subject median / baseline median, met when at least ``minimum`` or at most ``maximum``
    (neither: for information)."""
    value, base = subject.median, baseline.median
    ratio = value / base if value is not None and base else None
    if minimum is not None:
        target, met = f"ratio >= {minimum:g}", ratio is not None and ratio >= minimum
    elif maximum is not None:
        target, met = f"ratio <= {maximum:g}", ratio is not None and ratio <= maximum
    else:
        target, met = "(for information)", None
    return Target(
        id=row_id,
        what=what,
        value=value,
        unit=subject.unit,
        baseline=base,
        ratio=ratio,
        target=target,
        met=met,
        note=note,
    )


def margin_row(
    row_id: str, what: str, subject: Measurement, baseline: Measurement, allowance: float, note: str = ""
) -> Target:
    """Met when the subject's median is at most the baseline's median plus ``allowance`` (same unit)."""
    value, base = subject.median, baseline.median
    return Target(
        id=row_id,
        what=what,
        value=value,
        unit=subject.unit,
        baseline=base,
        ratio=value / base if value is not None and base else None,
        target=f"<= baseline + {allowance:g} {subject.unit}",
        met=value is not None and base is not None and value <= base + allowance,
        note=note,
    )


def bound_row(
    row_id: str,
    what: str,
    measurement: Measurement,
    *,
    at_least: float | None = None,
    at_most: float | None = None,
    reference: float | None = None,
    note: str = "",
) -> Target:
    """An absolute target on a measurement's median; ``reference`` only adds a ratio for context."""
    value = measurement.median
    if at_least is not None:
        target, met = f">= {at_least:g} {measurement.unit}", value is not None and value >= at_least
    elif at_most is not None:
        target, met = f"<= {at_most:g} {measurement.unit}", value is not None and value <= at_most
    else:
        target, met = "(for information)", None
    return Target(
        id=row_id,
        what=what,
        value=value,
        unit=measurement.unit,
        baseline=reference,
        ratio=value / reference if value is not None and reference else None,
        target=target,
        met=met,
        note=note,
    )
