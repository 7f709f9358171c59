"""Prometheus metrics of the server (`GET /metrics`), in a registry of its own (several servers may
share a process, as in the tests). Names follow vLLM's where one exists (`vllm:` -> `gptoss:`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Latency buckets (seconds): TTFT spans a queue wait and a long prefill; ITL one decode step.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self, model_name: str):
        self.registry = r = CollectorRegistry()
        label = dict(labelnames=("model_name",))
        self.running = Gauge("gptoss:num_requests_running", "Requests holding a decode slot", registry=r, **label)
        self.waiting = Gauge("gptoss:num_requests_waiting", "Requests waiting for a slot", registry=r, **label)
        self.slot_usage = Gauge("gptoss:slot_usage_perc", "Fraction of decode slots in use", registry=r, **label)
        self._prompt = Counter("gptoss:prompt_tokens", "Prompt tokens of finished requests", registry=r, **label)
        self._generation = Counter("gptoss:generation_tokens", "Generated tokens", registry=r, **label)
        self._finished = Counter("gptoss:request_success", "Finished requests by finish reason", registry=r,
                                 labelnames=("model_name", "finished_reason"))
        self._ttft = Histogram("gptoss:time_to_first_token_seconds", "Time to first token", registry=r,
                               buckets=TTFT_BUCKETS, **label)
        self._itl = Histogram("gptoss:inter_token_latency_seconds", "Time between output tokens", registry=r,
                              buckets=ITL_BUCKETS, **label)
        self.model_name = model_name
        self.running, self.waiting, self.slot_usage = (g.labels(model_name) for g in
                                                       (self.running, self.waiting, self.slot_usage))
        self.prompt_tokens, self.generation_tokens = self._prompt.labels(model_name), self._generation.labels(model_name)
        self.ttft, self.itl = self._ttft.labels(model_name), self._itl.labels(model_name)

    def finished(self, reason: str):
        return self._finished.labels(self.model_name, reason)

    def engine_state(self, running: int, waiting: int, slots: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.slot_usage.set(running / slots)

    def render(self) -> bytes:
        return generate_latest(self.registry)

