"""Latency as the reports state it: on LATENCY_THREADS CPU threads, in process CPU time, thread count restored."""
import torch

from netvlad_toolkit.runs import measure


class RecordsThreads(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.threads = []

    def forward(self, images):
        self.threads.append(torch.get_num_threads())
        return images.mean(dim=(2, 3))


def test_latency_runs_on_one_thread_in_process_cpu_time_and_restores_the_thread_count(monkeypatch):
    clock = iter(range(0, 10 ** 6, 7))  # a process clock that advances 7 s per reading, read twice per pass
    monkeypatch.setattr(measure.time, 'process_time', lambda: next(clock))
    monkeypatch.setattr(measure.time, 'perf_counter', lambda: 0.0)  # a wall clock would give 0 ms
    torch.set_num_threads(2)
    model = RecordsThreads()
    ms = measure.latency_ms(model, (32, 32), repeats=5, warmup=1, batch=1)
    assert ms == 7000.0
    assert model.threads == [measure.LATENCY_THREADS] * 6 and measure.LATENCY_THREADS == 1
    assert torch.get_num_threads() == 2
    torch.set_num_threads(1)  # as conftest set it


def test_latency_text_names_threads_and_clock():
    assert measure.LATENCY_TEXT == '1 CPU thread, process CPU time'
