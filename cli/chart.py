"""Cost per team per day as a stacked bar chart (PNG), for `fareway report --chart`."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from accounting.reports import UsageReport


def cost_chart(report: UsageReport, path: Path, title: str = "Cost to serve per team per day") -> None:
    """Draws a report grouped by ("day", "team"): one bar per day, one colour per team,
    each team's cost to serve plus its idle cost or share."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    from matplotlib import pyplot as plt

    if report.group_by != ("day", "team"):
        raise ValueError(f"a cost chart needs a report grouped by day,team, got {','.join(report.group_by)}")
    days = sorted({group[0] for group, _ in report.rows})
    by_team: dict[str, dict[str, float]] = defaultdict(dict)
    for (day, team), totals in report.rows:
        by_team[team][day] = float(totals.cost_usd + totals.idle_usd)
    figure, axes = plt.subplots(figsize=(max(6.0, 0.5 * len(days) + 3), 4.5), dpi=100)
    bottom = [0.0] * len(days)
    for team in sorted(by_team):
        heights = [by_team[team].get(day, 0.0) for day in days]
        axes.bar(days, heights, bottom=bottom, label=team)
        bottom = [b + h for b, h in zip(bottom, heights)]
    axes.set_title(title)
    axes.set_ylabel("USD")
    axes.tick_params(axis="x", labelrotation=45)
    axes.legend(title="team", fontsize="small")
    figure.tight_layout()
    figure.savefig(path, format="png")
    plt.close(figure)
