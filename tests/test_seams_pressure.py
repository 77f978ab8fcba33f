"""A node's pressure report as ``status`` shows it: the agent's report with its tier stats merged into a copy,
never the report itself changed in place."""

def test_status_merges_an_agents_stats_into_a_new_report_leaving_its_own_as_it_came():
    from jobs.service_runner import _merge_stats

    report = {"tiers": {"host": {"used": 1}, "disk": {"used": 2}}}
    merged = _merge_stats(report, {"served": {"hits": {"host": 4, "disk": 1}, "misses": 2}})
    assert report == {"tiers": {"host": {"used": 1}, "disk": {"used": 2}}}
    assert merged["tiers"]["host"] == {"used": 1, "served_hits": 4, "hits": 4, "misses": 3}
