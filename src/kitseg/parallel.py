"""Worker processes for per-case work (preparing training cases, drawing phantoms)."""

from __future__ import annotations


def one_blas_thread() -> None:
    """Make this (worker) process run one BLAS thread.

    Numpy's BLAS starts one thread per core in every process: N workers would run N x cores
    threads, which thrash. On a 16-core GPU machine, 16 such workers had not prepared 150 cases
    after 9 minutes; here (2 cores) 6 workers took 47.8 s for 6 cases with BLAS's default threads
    and 22.2 s with one each. Set at run time (threadpoolctl), since a forked worker inherits the
    thread pool its parent's BLAS started.
    """
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1)  # lasts for the worker's life


def stop_workers(pool) -> None:
    """Stop a ``ProcessPoolExecutor``'s workers now: the command was interrupted (Ctrl-C, SIGTERM).

    Left to finish, each would draw or prepare its case for up to a minute more, and a second
    signal (which kills the parent) would orphan them, still drawing. What they write goes to a
    temporary name first, so nothing is lost but their time. Python before 3.14 has no public
    way (``terminate_workers``), hence the executor's own process table.
    """
    terminate = getattr(pool, "terminate_workers", None)
    if terminate is not None:
        terminate()
        return
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        process.terminate()
