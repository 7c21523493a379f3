"""Prometheus metrics of one service instance (its own registry, passed to who needs it)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.inbound = Counter("bridge_inbound_events", "Inbound events accepted", ["channel", "kind"], registry=r)
        self.duplicates = Counter("bridge_inbound_duplicates", "Inbound events ignored as duplicates", ["channel"], registry=r)
        self.turns = Counter("bridge_turns", "Turns finished, by final status", ["status"], registry=r)
        self.turn_latency = Histogram(
            "bridge_turn_duration_seconds", "From message accepted to final reply queued",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800), registry=r,
        )
        self.runtime_overhead = Histogram(
            "bridge_runtime_overhead_seconds",
            "The bridge's own time around a runtime turn: start = message accepted, or out of its wait (behind "
            "its conversation's earlier turn, the burst pacing, a runtime slot) -> turn sent to the runtime (less "
            "time spent waiting on the runtime); finish = runtime done -> reply queued",
            ["phase"], buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1), registry=r,
        )
        self.turns_running = Gauge("bridge_turns_running", "Turns running now", registry=r)
        self.turns_waiting_for_slot = Gauge(
            "bridge_turns_waiting_for_slot", "Messages waiting for a runtime slot (BRIDGE_MAX_CONCURRENT_TURNS)",
            registry=r)
        self.outbox_depth = Gauge("bridge_outbox_depth", "Outbox operations by status", ["status"], registry=r)
        self.delivery_attempts = Counter("bridge_delivery_attempts", "Delivery attempts", ["channel"], registry=r)
        self.delivery_failures = Counter(
            "bridge_delivery_failures", "Failed delivery attempts", ["channel", "kind"], registry=r
        )
        self.approvals_pending = Gauge("bridge_approvals_pending", "Approvals waiting for a decision", registry=r)
        self.approvals = Counter("bridge_approvals", "Approval requests by outcome", ["outcome"], registry=r)
        self.store_up = Gauge("bridge_store_up", "1 when the store answered this scrape's reads, else 0", registry=r)
        self.store_writes_queued = Gauge("bridge_store_writes_queued", "Writes waiting for the store's writer",
                                         registry=r)
        self.store_waiting = Gauge("bridge_store_unreachable_seconds",
                                   "How long the writer has been waiting for an unreachable database (0: it is not)",
                                   registry=r)

        self.shared_files = Gauge("bridge_shared_files", "Several replicas: attached files kept in the store",
                                  registry=r)
        self.shared_files_bytes = Gauge("bridge_shared_files_bytes",
                                        "Several replicas: bytes of the attached files kept in the store", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
