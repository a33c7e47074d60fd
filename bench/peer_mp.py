#!/usr/bin/env python3
"""bench/peer_mp.py: the peer of cases 1, 3 and 5 through Python's
multiprocessing.Pool.imap, for bench/run.lua (case 8). Python is a peer
only, never a dependency of parmap.

    python3 bench/peer_mp.py [quick]

Prints one `PEER case=... key=value ...` line per case:
  case=1   x + 1 over 1,000,000 ints, Pool(2).imap summed in the parent by a
           for loop (as case 1 does in Lua; sum() is reported too), at the
           best of a few chunk sizes; pool start-up excluded (the pool is
           started and warmed before timing).
  case=3   120 items of ~5 ms of pure-Python busy loop: serial (a plain
           loop) against Pool(ncpu).imap with chunksize 1; pool start-up
           excluded.
  case=5   a map of 2 items on 2 processes, median per call: `warm` on a
           running pool (start-up excluded), `cold` starting a Pool(2),
           mapping, then close() and join() (like a parmap call, which forks
           and reaps its workers every time).
"""
import multiprocessing as mp
import os
import statistics
import sys
import time

QUICK = len(sys.argv) > 1 and sys.argv[1] == "quick"
now = time.perf_counter


def inc(x):
    return x + 1


def ident(x):
    return x


def spin(k):
    x = 0
    for j in range(k):
        x += j % 7
    return x


def ncpu():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def line(**kw):
    print("PEER " + " ".join(
        f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in kw.items()), flush=True)


def case1(pool, n=1_000_000):
    items = list(range(1, n + 1))
    expect = n * (n + 1) // 2 + n
    t0 = now()
    s = 0
    for x in items:
        s += inc(x)
    serial = now() - t0
    assert s == expect

    # A for loop consumes the results, like the Lua for loop of case 1;
    # sum() (a C loop) is reported too.
    def run(cs, use_sum=False):
        t0 = now()
        if use_sum:
            s = sum(pool.imap(inc, items, chunksize=cs))
        else:
            s = 0
            for r in pool.imap(inc, items, chunksize=cs):
                s += r
        t = now() - t0
        assert s == expect
        return t

    sizes = [500, 2000, 5000, 10000, 50000] if not QUICK else [2000, 5000]
    tried = {cs: run(cs) for cs in sizes}
    best = min(tried, key=tried.get)
    more = 2 if not QUICK else 0
    t = statistics.median([tried[best]] + [run(best) for _ in range(more)])
    t_sum = statistics.median([run(best, True) for _ in range(1 + more)])
    line(case=1, items=n, N=2, chunksize=best, seconds=t, items_per_s=n / t,
         sum_items_per_s=n / t_sum, serial_items_per_s=n / serial,
         tried=",".join(f"{cs}:{n / tried[cs] / 1e6:.2f}" for cs in sizes))


def case3(n=120, ms=5.0):
    N = ncpu()
    k = 200000
    spin(k)
    tries = []
    for _ in range(5):
        t0 = now()
        spin(k)
        tries.append(k / ((now() - t0) * 1000))
    per_ms = statistics.median(tries)
    k = int(per_ms * ms)
    items = [k] * n
    serial, par = [], []
    with mp.Pool(N) as pool:
        list(pool.imap(ident, range(N)))  # started and warm
        for _ in range(1 if QUICK else 3):  # interleaved, medians
            t0 = now()
            r1 = [spin(x) for x in items]
            serial.append(now() - t0)
            t0 = now()
            r2 = list(pool.imap(spin, items, chunksize=1))
            par.append(now() - t0)
            assert r1 == r2
    t1, t2 = statistics.median(serial), statistics.median(par)
    line(case=3, items=n, N=N, seconds=t2, serial_seconds=t1,
         item_ms=t1 * 1000 / n, ratio=t1 / t2)


def case5(calls=200, cold_calls=30):
    if QUICK:
        calls, cold_calls = 50, 10
    with mp.Pool(2) as pool:
        for _ in range(3):
            list(pool.imap(ident, [1, 2]))
        warm = []
        for _ in range(calls):
            t0 = now()
            r = list(pool.imap(ident, [1, 2]))
            warm.append(now() - t0)
            assert r == [1, 2]
    cold = []
    for _ in range(cold_calls):
        t0 = now()
        pool = mp.Pool(2)
        r = list(pool.imap(ident, [1, 2]))
        pool.close()
        pool.join()
        cold.append(now() - t0)
        assert r == [1, 2]
    line(case=5, items=2, N=2, warm_ms=statistics.median(warm) * 1000,
         cold_ms=statistics.median(cold) * 1000, calls=calls)


def main():
    if mp.get_start_method(allow_none=True) is None:
        mp.set_start_method("fork")  # Linux's default before 3.14
    with mp.Pool(2) as pool:
        list(pool.imap(ident, range(4)))  # started and warm
        case1(pool)
    case3()
    case5()


if __name__ == "__main__":
    main()
