"""pytest plugin of `tools/mutate.py`: which test executes which line, and how long each test takes.

Loaded as ``-p mutate_coverage`` (with ``tools/`` on ``PYTHONPATH``) in the coverage pass of the tool.
coverage.py records every line of the files named in ``MUTATE_INCLUDE`` (a JSON list of absolute paths)
under a *context* that is the id of the running test, and the plugin writes, into ``MUTATE_OUTPUT``::

    {"lines": {path: {line: [test index, ...]}}, "tests": [node id, ...],
     "durations": {node id: seconds}, "failed": [node id, ...]}

Only lines executed inside a test's setup, call or teardown are attributed; code that runs when a
module is imported has no test and is handled by the tool (it widens the selection to the tests of the
enclosing function, class or file).
"""
from __future__ import annotations

import collections
import json
import os

import coverage

_COVERAGE = coverage.Coverage(data_file=None, include=json.loads(os.environ["MUTATE_INCLUDE"]), branch=False)
_DURATIONS: dict = collections.defaultdict(float)
_FAILED: list = []


def pytest_configure(config):
    _COVERAGE.start()


def pytest_runtest_setup(item):
    _COVERAGE.switch_context(item.nodeid)


def pytest_runtest_logreport(report):
    _DURATIONS[report.nodeid] += report.duration
    if report.failed:
        _FAILED.append(report.nodeid)


def pytest_unconfigure(config):
    _COVERAGE.switch_context("")
    _COVERAGE.stop()
    data = _COVERAGE.get_data()
    tests = sorted(_DURATIONS)
    index = {test: i for i, test in enumerate(tests)}
    lines = {}
    for path in data.measured_files():
        by_line = {}
        for line, contexts in data.contexts_by_lineno(path).items():
            ids = sorted({index[c] for c in contexts if c in index})
            if ids:
                by_line[line] = ids
        if by_line:
            lines[os.path.realpath(path)] = by_line
    with open(os.environ["MUTATE_OUTPUT"], "w", encoding="utf-8") as f:
        json.dump({"lines": lines, "tests": tests, "durations": dict(_DURATIONS), "failed": sorted(set(_FAILED))}, f)
