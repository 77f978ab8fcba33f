"""The dashboard test's PromQL subset (tests/promql.py) against hand-computed answers."""

import math

import pytest

from tests.promql import PromQLError, Store, evaluate, parse

SCRAPE_0 = """\
# TYPE ray_hits_total counter
ray_hits_total{node="a",tier="host",SessionName="s1"} 10
ray_hits_total{node="a",tier="disk",SessionName="s1"} 0
ray_hits_total{node="b",tier="host",SessionName="s2"} 5
# TYPE ray_misses_total counter
ray_misses_total{node="a",tier="all",SessionName="s1"} 10
# TYPE ray_used gauge
ray_used{node="a",tier="host",SessionName="s1"} 100
ray_used{node="b",tier="host",SessionName="s1"} 50
# TYPE ray_ttft_seconds histogram
ray_ttft_seconds_bucket{le="0.1",node="a"} 0
ray_ttft_seconds_bucket{le="1.0",node="a"} 0
ray_ttft_seconds_bucket{le="+Inf",node="a"} 0
ray_ttft_seconds_sum{node="a"} 0
ray_ttft_seconds_count{node="a"} 0
"""
SCRAPE_1 = """\
# TYPE ray_hits_total counter
ray_hits_total{node="a",tier="host",SessionName="s1"} 70
ray_hits_total{node="a",tier="disk",SessionName="s1"} 30
ray_hits_total{node="b",tier="host",SessionName="s2"} 3
# TYPE ray_misses_total counter
ray_misses_total{node="a",tier="all",SessionName="s1"} 110
# TYPE ray_used gauge
ray_used{node="a",tier="host",SessionName="s1"} 300
# TYPE ray_ttft_seconds histogram
ray_ttft_seconds_bucket{le="0.1",node="a"} 2
ray_ttft_seconds_bucket{le="1.0",node="a"} 8
ray_ttft_seconds_bucket{le="+Inf",node="a"} 10
ray_ttft_seconds_sum{node="a"} 5
ray_ttft_seconds_count{node="a"} 10
"""


@pytest.fixture
def store():
    s = Store()
    s.add_scrape(100.0, SCRAPE_0)
    s.add_scrape(110.0, SCRAPE_1)  # 10 s later
    return s


def test_selector_takes_each_series_latest_sample_and_matches_labels(store):
    v = evaluate('ray_used{SessionName=~"s.*"}', store)
    assert sorted(v.values()) == [50.0, 300.0]  # b has no sample in the second scrape: its last one stays
    assert list(evaluate('ray_used{node="a"}', store).values()) == [300.0]
    assert evaluate('ray_used{node!="a"}', store) == {
        (("SessionName", "s1"), ("__name__", "ray_used"), ("node", "b"), ("tier", "host")): 50.0}
    assert evaluate('ray_used{node=~"a|b",tier!~"ho.*"}', store) == {}
    assert evaluate('ray_used{node=~"."}', store) and not evaluate('ray_used{node=~""}', store)  # anchored


def test_rate_sum_by_and_a_counter_reset(store):
    # host on a: +60 in 10 s; disk on a: +30; host on b was reset (5 -> 3): an increase of 3
    assert evaluate('sum by (tier) (rate(ray_hits_total{SessionName=~".*"}[1m]))', store) == {
        (("tier", "host"),): pytest.approx(6.3), (("tier", "disk"),): pytest.approx(3.0)}
    assert evaluate("sum(rate(ray_hits_total[5m]))", store) == {(): pytest.approx(9.3)}
    # a range that holds only the last sample: no rate
    assert evaluate("rate(ray_hits_total[5s])", store) == {}


def test_ratio_of_sums_and_avg(store):
    expr = "sum(rate(ray_hits_total[5m])) / (sum(rate(ray_hits_total[5m])) + sum(rate(ray_misses_total[5m])))"
    assert evaluate(expr, store)[()] == pytest.approx(9.3 / (9.3 + 10.0))
    assert evaluate('avg by (tier) (ray_used{SessionName="s1"})', store) == {(("tier", "host"),): 175.0}
    # 0 / 0 is NaN and x / 0 infinite, as in Prometheus
    assert math.isnan(evaluate('sum(rate(ray_hits_total{tier="none"}[5m])) / 1', store).get((), math.nan))
    assert math.isinf(evaluate("sum(rate(ray_hits_total[5m])) / 0", store)[()])


def test_histogram_quantile_interpolates_inside_the_bucket(store):
    expr = "histogram_quantile({q}, sum by (le) (rate(ray_ttft_seconds_bucket[5m])))"
    # 10 observations: 2 in (0, 0.1], 6 in (0.1, 1], 2 above 1
    assert evaluate(expr.format(q=0.5), store)[()] == pytest.approx(0.1 + 0.9 * (5 - 2) / 6)
    assert evaluate(expr.format(q=0.1), store)[()] == pytest.approx(0.05)
    assert evaluate(expr.format(q=0.99), store)[()] == 1.0  # in the +Inf bucket: the highest finite bound
    s = Store()
    s.add_scrape(0.0, SCRAPE_0)
    s.add_scrape(10.0, SCRAPE_0)  # no observations in the range
    assert math.isnan(evaluate(expr.format(q=0.5), s)[()])
    # the mean from _sum / _count
    assert evaluate("sum(rate(ray_ttft_seconds_sum[5m])) / sum(rate(ray_ttft_seconds_count[5m]))", store)[()] == 0.5


@pytest.mark.parametrize("expr", [
    "sum(rate(x[5m])) * 2",                       # an operator outside the subset
    "sum(rate(x[5m])) - 1",
    "max by (tier) (x)",                          # an aggregation outside the subset
    "sum without (tier) (x)",
    "sum(x) by (tier)",                           # trailing clause
    "increase(x[5m])",                            # a function outside the subset
    "irate(x[1m])",
    "x[5m]",                                      # a range selector outside rate()
    "x offset 5m",
    "a / on (node) b",
    'x{a>"1"}',
    "sum(rate(x[5m])",                            # unbalanced
])
def test_anything_outside_the_subset_raises(expr, store):
    with pytest.raises(PromQLError):
        evaluate(expr, store)


def test_parse_precedence():
    node = parse("a / b + c / d")  # (a / b) + (c / d)
    assert node.kind == "binop" and node.args[0] == "+"
    assert node.args[1].args[0] == "/" and node.args[2].args[0] == "/"
