"""Issue 11, item 5: property-based fuzzing of the readers and the CLI's argument space.

The mutations are tools/fuzz.py's (bit flips, truncations, swapped / duplicated fields,
huge varints, wrong wire types on golden caffemodels; line and token edits on golden
prototxts; command lines drawn from the parser's own flags). The only acceptable
outcomes: exit 0, or exit 2 with a one-line error; never another exception, a case
over 10 s, or a crash. A bounded run (well under 60 s); ``tools/fuzz.py`` runs long.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import fuzz  # noqa: E402

pytestmark = pytest.mark.fuzz
FILES = fuzz.seed_files()
WITH_WEIGHTS = [f for f in FILES if f[1]]
BOUNDED = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def check(kind, payload, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        problem, argv, err = fuzz.run_case(kind, payload, tmp_path)
    assert not problem, f"{problem}\nargv: {argv}"


@BOUNDED
@given(rnd=st.randoms(use_true_random=False), pair=st.sampled_from(WITH_WEIGHTS))
def test_mutated_caffemodels(tmp_path, rnd, pair):
    check("caffemodel", (pair, fuzz.mutate_caffemodel(pair[1].read_bytes(), rnd)), tmp_path)


@BOUNDED
@given(rnd=st.randoms(use_true_random=False), pair=st.sampled_from(FILES))
def test_mutated_prototxts(tmp_path, rnd, pair):
    check("prototxt", (pair, fuzz.mutate_prototxt(pair[0].read_bytes(), rnd)), tmp_path)


@BOUNDED
@given(data=st.binary(max_size=512), pair=st.sampled_from(WITH_WEIGHTS))
def test_arbitrary_bytes_as_caffemodel_and_prototxt(tmp_path, data, pair):
    check("caffemodel", (pair, data), tmp_path)
    check("prototxt", ((pair[0], None), data), tmp_path)


@settings(max_examples=30, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(rnd=st.randoms(use_true_random=False))
def test_cli_argument_space(tmp_path, rnd):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    check("argv", fuzz.random_argv(rnd, FILES, out), tmp_path)


def test_the_oracle_catches_what_it_must():
    assert fuzz.judge(3, "", "lrprune-caffe: error: internal error: X") != ""
    assert fuzz.judge(2, "", "Traceback (most recent call last):\nlrprune-caffe: error: x") != ""
    assert fuzz.judge(2, "", "lrprune-caffe: error: a\nlrprune-caffe: error: b") != ""
    assert fuzz.judge(None, "", "") != ""
    assert fuzz.judge(2, "", "lrprune-caffe: error: one line") == ""
