"""What `batchgen validate` reports: request, image and (estimated) credit totals, per model and overall."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from batchgen.models import GenerationRequest


@dataclass
class ModelTotals:
    requests: int = 0
    images: int = 0
    credits: float = 0.0


@dataclass
class ValidationSummary:
    """What `batchgen validate` prints: counts and an estimate of credits (catalogue estimates)."""

    job: str
    requests: int = 0
    images: int = 0
    credits: float = 0.0
    by_model: dict[str, ModelTotals] = field(default_factory=dict)
    max_credits: float | None = None  # the manifest's run.max_credits (a --max-credits flag wins over it)

    def cap_share(self) -> float | None:
        """The share of the estimate the manifest's own credit cap lets through, when it cannot cover it all."""
        if self.max_credits is None or self.credits <= self.max_credits:
            return None
        return self.max_credits / self.credits

    def add(self, request: GenerationRequest) -> None:
        credits = request.estimated_credits()
        self.requests += 1
        self.images += request.n
        self.credits += credits
        row = self.by_model.get(request.model)
        if row is None:
            row = self.by_model[request.model] = ModelTotals()
        row.requests += 1
        row.images += request.n
        row.credits += credits

    def to_dict(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "requests": self.requests,
            "images": self.images,
            "credits": round(self.credits, 4),
            "credits_are_estimates": True,
            "max_credits": self.max_credits,
            "by_model": {m: {"requests": r.requests, "images": r.images, "credits": round(r.credits, 4)}
                         for m, r in sorted(self.by_model.items())},
        }
