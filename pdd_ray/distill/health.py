"""Did a stage learn anything? Flags for a stage that diverged, so it is not reported as PDD.

With a far too large image learning rate, validation accuracy can fall from 71 % to 3 % while
selection quietly keeps iteration 0 — the real images the stage started from. The table would
then call a random real subset "PDD stage k". These flags travel to the warning line, to
``results.json``, to MLflow and to the table row.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

#: Validation has collapsed when the last check lost more than this share of iteration 0's
#: margin over chance (71 % → 3 % on 10 classes loses all of it; 95 % → 93 % loses 2 %).
COLLAPSE_SHARE = 0.5


@dataclass(frozen=True)
class StageHealth:
    """What selection kept for one stage, and whether validation collapsed on the way."""

    stage: int
    best_iteration: int
    first_val_acc: float  # iteration 0: the initialisation
    best_val_acc: float
    final_val_acc: float  # the last validation check
    kept_initialisation: bool  # the selected iterate is iteration 0 although the stage ran
    validation_collapsed: bool

    @property
    def mark(self) -> str:
        """A note for the table row ('' when the stage is fine)."""
        if self.kept_initialisation:
            return "= initialisation"
        if self.validation_collapsed:
            return f"diverged, kept it. {self.best_iteration}"
        return ""

    @property
    def warning(self) -> str | None:
        """One line for the user, or None."""
        k, pct = self.stage, lambda v: f"{v * 100:.1f}%"
        curve = f"validation {pct(self.first_val_acc)} at iteration 0, {pct(self.final_val_acc)} at the end"
        if self.kept_initialisation:
            return (f"stage {k} did not improve on its initialisation ({curve}); its images are the real "
                    "images it started from, not distilled ones (a smaller learning rate, e.g. distill.lr_img, "
                    "or more iterations may help)")
        if self.validation_collapsed:
            return (f"stage {k} diverged ({curve}); selection kept iteration {self.best_iteration} "
                    f"({pct(self.best_val_acc)}); a smaller learning rate (e.g. distill.lr_img) may help")
        return None

    def to_dict(self) -> dict:
        return {**asdict(self), "warning": self.warning}


def stage_health(stage: int, best_iteration: int, best_val_acc: float, val_history: list[tuple[int, float]],
                 num_classes: int, iterations: int) -> StageHealth:
    """Flags from a finished stage's selection and validation history (see :class:`StageHealth`)."""
    accs = [a for _, a in val_history]
    first = accs[0] if accs else best_val_acc
    final = accs[-1] if accs else best_val_acc
    chance = 1.0 / max(num_classes, 1)
    margin = first - chance
    collapsed = margin > 0 and final < chance + (1 - COLLAPSE_SHARE) * margin
    return StageHealth(stage, best_iteration, first, best_val_acc, final,
                       kept_initialisation=best_iteration == 0 and iterations > 0, validation_collapsed=collapsed)
