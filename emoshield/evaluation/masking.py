"""The gradient-masking sweep's settings and its follow-up rule, torch-free: the evaluator
(robustness.py), the study reports and scripts/results_md.py read the same floor."""

from __future__ import annotations

MASKING_SWEEP = (0.03, 0.05, 0.1)  # PGD at growing eps: 0.1 is 25/255, enough to break any face model
MASKING_FLOOR = 0.1  # accuracy PGD must get below at the sweep's largest eps


def sweep_followup_eps(report: dict | None) -> str | None:
    """The sweep's largest eps when PGD left accuracy above the floor there and no APGD-CE
    follow-up has run yet (what sweep_followup and recheck_masking act on), else None."""
    checks = (report or {}).get("masking_checks") or {}
    sweep = checks.get("sweep") or {}
    if not sweep or "sweep_apgd" in checks:
        return None
    largest = max(sweep, key=float)
    return largest if sweep[largest] > MASKING_FLOOR else None
