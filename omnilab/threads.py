"""How many intra-op threads torch uses, chosen once where a model is loaded, and said in one line.

torch's default is the machine's physical core count, whatever share of the machine this process may use: in a
container or under `taskset` with 2 of 16 cores it runs 16 threads on 2 cores, and every op waits for the
descheduled ones (the CLI decoded 3.8 tokens/s so on a busy machine, 33.5 on one thread). `choose_threads` sets
torch to the cores this process may run on (os.sched_getaffinity), and to one thread for a model too narrow to
split (hidden size under SMALL_HIDDEN: each op is microseconds, so a second thread only adds a barrier), unless
the user said otherwise: an explicit value, OMNILAB_THREADS, or OMP_NUM_THREADS (what `omnilab regress` sets to
1 for each notebook it runs side by side), or torch.set_num_threads called since the last choice.
"""

from __future__ import annotations

import os

SMALL_HIDDEN = 1024  # models narrower than this run on one thread (data/omni-tiny: hidden 256)
_last: int | None = None  # what this module last set, to notice a torch.set_num_threads in between


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask; os.cpu_count() where there is none)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def decide(threads: int | None = None, hidden_size: int | None = None, *, cores: int | None = None,
           env: dict | None = None, current: int | None = None) -> tuple[int, str]:
    """(threads, why) without touching torch: an explicit value, then OMNILAB_THREADS, then OMP_NUM_THREADS,
    then a count set by torch.set_num_threads (`current` differing from what was last chosen), then one thread
    for a model narrower than SMALL_HIDDEN, else every available core."""
    env = os.environ if env is None else env
    cores = available_cores() if cores is None else cores
    if threads is not None:
        return max(1, int(threads)), "explicit"
    for name in ("OMNILAB_THREADS", "OMP_NUM_THREADS"):
        value = env.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value), f"{name}={value}"
    if _last is not None and current is not None and current != _last:
        return current, "set by torch.set_num_threads"
    if hidden_size is not None and hidden_size < SMALL_HIDDEN:
        return 1, f"hidden size {hidden_size} < {SMALL_HIDDEN}: too narrow to split; {cores} cores available"
    return cores, f"the cores this process may use (of {os.cpu_count()} on the machine)"


def choose_threads(threads: int | None = None, hidden_size: int | None = None) -> str:
    """Set torch's intra-op threads (see `decide`) and return one line, "threads: N (why)"."""
    global _last
    import torch

    n, why = decide(threads, hidden_size, current=torch.get_num_threads())
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    _last = n
    return f"threads: {n} ({why})"
