"""Collection of the ``backend`` tests of test_select.py: a (test, path) pair is collected only
when the path runs code of its own on the test's inputs (``@path_inputs``), so forced C++
paths are not generated for dtypes or sizes where they would repeat the default path, and
inputs larger than a slow path accepts are not generated for it. Pairs left out are
reported as deselected, with one summary line."""

import pytest

_COUNT = pytest.StashKey[int]()


def pytest_collection_modifyitems(config, items):
    kept, left_out = [], []
    for item in items:
        mark = item.get_closest_marker("path_inputs")
        params = getattr(getattr(item, "callspec", None), "params", {})
        path = params.get("backend")
        if mark is None or path is None:
            kept.append(item)
            continue
        dtypes, max_n = mark.kwargs["dtypes"], mark.kwargs["max_n"]
        if isinstance(dtypes, str):
            dtypes = (params[dtypes],)
        if isinstance(max_n, str):
            max_n = params[max_n]
        ok = path.runs_own_code(dtypes, max_n) and max_n <= path.max_numel
        (kept if ok else left_out).append(item)
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = kept
    config.stash[_COUNT] = len(left_out)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "path_inputs(dtypes, max_n): the inputs a backend test gives its path"
    )


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    n = config.stash.get(_COUNT, 0)
    if n:
        terminalreporter.write_line(
            f"{n} (test, forced path) pairs not collected: the path would run the default "
            "code on those inputs (listed as deselected)"
        )
