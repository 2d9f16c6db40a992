"""What the live evaluation memory costs per shopper: bytes stored and CPU per event and per scoring.

Pure, one core, no broker: folds the simulator's event log (simulated clock) through each
shopper's :class:`features.state.ShopperState` and :class:`models.outcomes.LiveMemory` the way the
worker does, scoring after every event (the worker scores once per shopper per micro-batch, so
this is the most scorings a log can cause, and the most served lists waiting within one grace
period) with a fixed top-10 list and two scores, then decoding
and encoding the memory as each batch does. Prints the encoded state and memory sizes per shopper
(what the envelope grows by) and the CPU time (process time: the machine may be shared) the
memory adds per event, from one pass with and one without it.

    .venv/bin/python bench/bench_live_memory.py --users 2000
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from features.encoding import encode_state  # noqa: E402
from features.events import Event  # noqa: E402
from features.state import APPLIED, ShopperState, StateConfig  # noqa: E402
from models.outcomes import CHURN, PURCHASE, RECOMMENDATION, SCORES, EvalConfig, LiveMemory  # noqa: E402
from models.variants import CHAMPION  # noqa: E402
from streams.sim.generator import GeneratorConfig, ShopSimulator  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    events = list(ShopSimulator(GeneratorConfig(seed=args.seed, n_shoppers=args.users)).events())
    events.sort(key=lambda e: e.ts_ms)
    state_config, config = StateConfig(), EvalConfig()
    items = [f"i{n:06d}" for n in range(10)]
    started = time.process_time()
    states, _ = fold(events, state_config, config, items, with_memory=False)
    bare_s = time.process_time() - started
    started = time.process_time()
    states, stored = fold(events, state_config, config, items, with_memory=True)
    with_memory_s = time.process_time() - started
    scorings = sum(LiveMemory.decode(value).score_seq for value in stored.values())
    memory_bytes = [len(value) for value in stored.values()]
    state_bytes = [len(encode_state(state)) for state in states.values()]
    print(f"{len(events)} events, {len(states)} shoppers, {scorings} scorings (one per applied event)")
    print(
        f"state bytes per shopper: mean {statistics.fmean(state_bytes):.0f}, "
        f"max {max(state_bytes)}; live memory bytes: mean {statistics.fmean(memory_bytes):.0f}, "
        f"p99 {sorted(memory_bytes)[int(0.99 * len(memory_bytes))]}, max {max(memory_bytes)} (+2 envelope bytes)"
    )
    ledgers = [LiveMemory.decode(value).ledger for value in stored.values()]
    resolved = sum(n for ledger in ledgers for key, n in ledger.items() if key[0] == "score")
    dropped = sum(n for ledger in ledgers for key, n in ledger.items() if key[0] == "dropped" and key[1] in SCORES)
    print(f"scores resolved {resolved}, dropped by the cap of {config.max_pending} pending: {dropped}")
    lists = sum(n for ledger in ledgers for key, n in ledger.items() if key[2:] == ("opportunities",))
    lists_dropped = sum(ledger.get(("dropped", RECOMMENDATION), 0) for ledger in ledgers)
    print(f"lists resolved {lists}, dropped by the cap of {config.max_lists} waiting: {lists_dropped}")
    print(
        f"state updates alone: {bare_s / len(events) * 1e6:.1f} us per event; with the memory (decode, "
        f"observe, record a scoring, encode): {with_memory_s / len(events) * 1e6:.1f} us per event, "
        f"so {(with_memory_s - bare_s) / scorings * 1e6:.1f} us per event and scoring added"
    )


def fold(
    events: list[Event], state_config: StateConfig, config: EvalConfig, items: list[str], with_memory: bool
) -> tuple[dict[str, ShopperState], dict[str, bytes]]:
    """Every event through its shopper's state and, ``with_memory``, memory as the worker does."""
    states: dict[str, ShopperState] = {}
    stored: dict[str, bytes] = {}
    for event in events:
        state = states.setdefault(event.user_id, ShopperState.new(event.user_id))
        if state.update(event, state_config) != APPLIED or not with_memory:
            continue
        memory = LiveMemory.decode(stored.get(event.user_id))
        memory.observe(event, state.last_event_ms, config)
        t_ms = state.last_event_ms
        memory.next_seq(t_ms)
        memory.record_score(CHURN, "shopper-classifier", "v20261203", CHAMPION, t_ms, 0.25, config)
        memory.record_score(PURCHASE, "shopper-classifier", "v20261203", CHAMPION, t_ms, 0.5, config)
        memory.record_list(CHAMPION, "nextitem", "v20261203", t_ms, items, config)
        stored[event.user_id] = memory.encode()
    return states, stored


if __name__ == "__main__":
    main()
