from cex_stack.collector import SpanRecord, render_trace


def _span(span_id: str, parent: str, service: str, name: str, start: int, end: int) -> SpanRecord:
    return SpanRecord(service, name, "ab" * 16, span_id, parent, 2, start, end)


def test_a_trace_renders_as_a_tree_in_start_order_with_orphans_marked() -> None:
    ms = 1_000_000
    spans = [
        _span("2", "1", "cex-order", "PlaceOrder", 1 * ms, 9 * ms),
        _span("1", "client", "cex-envoy", "ingress", 0, 10 * ms),
        _span("4", "2", "cex-match", "match.command", 5 * ms, 8 * ms),
        _span("3", "2", "cex-risk", "CheckOrder", 2 * ms, 3 * ms),
        _span("5", "gone", "cex-ledger", "ledger.settle", 11 * ms, 12 * ms),
    ]
    lines = render_trace(spans).splitlines()
    assert lines[0] == f"trace {'ab' * 16} (5 spans)"
    assert [line.split(" ms  ", 1)[1] for line in lines[1:]] == [
        "cex-envoy: ingress (orphan)",
        "  cex-order: PlaceOrder",
        "    cex-risk: CheckOrder",
        "    cex-match: match.command",
        "cex-ledger: ledger.settle (orphan)",
    ]
    assert lines[2].split()[:2] == ["1.0", "8.0"]
