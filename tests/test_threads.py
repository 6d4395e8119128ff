"""The thread choice: torch's intra-op threads follow what the process may use and what the user said."""

from __future__ import annotations

import os

import torch

from omnilab import threads


def test_decide_orders_the_reasons(monkeypatch):
    monkeypatch.setattr(threads, "_last", None)
    assert threads.decide(3, 4096, cores=8, env={"OMP_NUM_THREADS": "1"}) == (3, "explicit")
    assert threads.decide(None, 4096, cores=8, env={"OMNILAB_THREADS": "2", "OMP_NUM_THREADS": "1"})[0] == 2
    assert threads.decide(None, 4096, cores=8, env={"OMP_NUM_THREADS": "1"}) == (1, "OMP_NUM_THREADS=1")
    n, why = threads.decide(None, 256, cores=8, env={})
    assert n == 1 and "hidden size 256" in why
    assert threads.decide(None, 4096, cores=8, env={})[0] == 8
    assert threads.decide(None, None, cores=2, env={"OMP_NUM_THREADS": "junk"})[0] == 2
    monkeypatch.setattr(threads, "_last", 4)  # the user called torch.set_num_threads(6) since
    assert threads.decide(None, 4096, cores=8, env={}, current=6) == (6, "set by torch.set_num_threads")


def test_choose_sets_torch_to_the_available_cores_and_says_so(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMNILAB_THREADS", raising=False)
    monkeypatch.setattr(threads, "_last", None)
    try:
        line = threads.choose_threads(hidden_size=4096)
        assert torch.get_num_threads() == len(os.sched_getaffinity(0))
        assert line.startswith(f"threads: {torch.get_num_threads()} (")
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what `omnilab regress` pins for each notebook
        assert threads.choose_threads(hidden_size=4096) == "threads: 1 (OMP_NUM_THREADS=1)"
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_loaded_model_says_its_threads(make_checkpoint, monkeypatch):
    from omnilab.model.decoder import SelectiveMoE

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    model = SelectiveMoE.from_checkpoint(make_checkpoint("moe"))
    assert model.threads == "threads: 1 (OMP_NUM_THREADS=1)"
