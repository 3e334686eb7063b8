"""The summary every recipe's data checker prints: rows read, kept, dropped (by reason), truncated, token lengths.

A recipe's checker runs the same validation and tokenization as its training data step (so a bad file fails
with the same one-line error and exit code 2) and hands the counts to `DataReport`; nothing is written and no
model is loaded. Lengths are each kept row's full token count BEFORE the max-length cut, so the distribution
says how much a larger max length would keep.
"""
import math
from collections import Counter


def percentile(sorted_values: list[int], p: float) -> int:
    """Nearest-rank percentile of an ascending list (the smallest value with at least p% of values at or below)."""
    if not sorted_values:
        return 0
    return sorted_values[max(1, math.ceil(p / 100 * len(sorted_values))) - 1]


class DataReport:
    def __init__(self, path: str, max_length: int, length_flag: str = "max_length"):
        self.path, self.max_length, self.length_flag = path, max_length, length_flag
        self.rows_read = 0
        self.dropped = Counter()
        self.truncated = 0
        self.lengths: list[int] = []  # kept rows, before the cut

    def drop(self, reason: str, count: int = 1) -> None:
        if count:
            self.dropped[reason] += count

    def keep(self, length: int, truncated: bool) -> None:
        self.lengths.append(length)
        self.truncated += bool(truncated)

    @property
    def kept(self) -> int:
        return len(self.lengths)

    def figures(self) -> dict:
        lengths = sorted(self.lengths)
        return {"rows_read": self.rows_read, "kept": self.kept, "dropped": dict(sorted(self.dropped.items())),
                "truncated": self.truncated, "max_length": self.max_length,
                "tokens_p50": percentile(lengths, 50), "tokens_p95": percentile(lengths, 95),
                "tokens_max": lengths[-1] if lengths else 0}

    def lines(self) -> list[str]:
        f = self.figures()
        out = [(f"{self.path}: rows read {f['rows_read']}, kept {f['kept']}, "
                f"dropped {sum(self.dropped.values())}, truncated {f['truncated']} "
                f"(at {self.length_flag}={self.max_length})")]
        out += [f"  dropped ({reason}): {count}" for reason, count in f["dropped"].items()]
        out.append(f"  tokens per kept row (before the cut): p50 {f['tokens_p50']}, p95 {f['tokens_p95']}, "
                   f"max {f['tokens_max']}")
        return out

    def print(self) -> None:
        print("\n".join(self.lines()))
