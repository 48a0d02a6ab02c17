"""What a run reports: per-step scalars summed over a log window and an epoch."""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from distributed import is_dist

class MetricMeter:
    """Running sums of named per-step scalars, for a log window and for the epoch.

    ``update(loss=..., lr=...)`` once per step; ``window_means()`` averages the steps since
    the last ``reset_window()`` (this rank); ``epoch_means(device)`` averages the epoch over
    all steps and all ranks (collective). ``state_dict`` holds the epoch sums, so a run
    resumed mid-epoch reports the same epoch means as one that was never stopped.
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0
        self._window: dict[str, float] = {}
        self._window_count = 0

    def update(self, **values: float) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)
            self._window[key] = self._window.get(key, 0.0) + float(value)
        self.count += 1
        self._window_count += 1

    @property
    def window_count(self) -> int:
        return self._window_count

    def window_means(self) -> dict[str, float]:
        return {k: v / max(self._window_count, 1) for k, v in self._window.items()}

    def reset_window(self) -> None:
        self._window, self._window_count = {}, 0

    def epoch_means(self, device: torch.device) -> dict[str, float]:
        keys = sorted(self.sums)
        totals = torch.tensor([self.sums[k] for k in keys] + [self.count], dtype=torch.float64,
                              device=device)
        if is_dist():
            dist.all_reduce(totals)
        values = totals.tolist()
        return {k: v / max(values[-1], 1) for k, v in zip(keys, values[:-1])}

    def state_dict(self) -> dict[str, Any]:
        return {"sums": dict(self.sums), "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums, self.count = dict(state["sums"]), int(state["count"])
