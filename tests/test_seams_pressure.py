"""A node's pressure report as ``status`` shows it: the agent's report with its tier stats merged into a new dict,
never the report itself changed in place."""

from actors.pressure_report import NodeReport, TierReport


def report() -> NodeReport:
    return NodeReport("n" * 32, "e", {"host": TierReport(1, 8, 1, 0.9, 0.75), "disk": TierReport(2, 16, 1, 0.9, 0.75)})


def test_status_merges_an_agents_stats_into_a_new_report_leaving_its_own_as_it_came():
    from jobs.service_runner import _merge_stats

    merged = _merge_stats(report(), {"served": {"hits": {"host": 4, "disk": 1}, "misses": 2}})
    assert report().tiers["host"] == TierReport(1, 8, 1, 0.9, 0.75)
    assert merged["tiers"]["host"] == {"used": 1, "capacity": 8, "entries": 1, "high": 0.9, "low": 0.75,
                                       "system": False, "served_hits": 4, "hits": 4, "misses": 3}
