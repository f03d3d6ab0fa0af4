"""courseware.borrowing: the hidden tests' check that a trainee wrote a graded function instead of calling ours."""

from __future__ import annotations

import math

from courseware.borrowing import borrowed
from reference_impl import loadtest
from reference_impl.monitoring import drift

FORBIDDEN = {"psi": drift.psi, "bin_fractions": drift.bin_fractions}


def _notebook(source: str, **names: object) -> dict:
    """Run ``source`` in a fresh namespace, as a notebook cell would (the namespace is its globals)."""
    env = {"math": math, **names}
    exec(compile(source, "<cell>", "exec"), env)  # the test writes its own input
    return env


def test_a_direct_call_an_alias_and_a_module_attribute_are_found() -> None:
    env = _notebook("def f(r, c):\n    return p(r, c)\n", p=drift.psi)
    assert borrowed(env["f"], FORBIDDEN) == ["psi"]
    env = _notebook("def f(v, e):\n    return d.bin_fractions(v, e)\n", d=drift)
    assert borrowed(env["f"], FORBIDDEN, modules=(drift,)) == ["bin_fractions"]


def test_calls_through_nested_functions_lambdas_and_notebook_helpers_are_found() -> None:
    env = _notebook(
        "def helper(v, e):\n    return bf(v, e)\n"
        "def f(r, c, e):\n    g = lambda x: helper(x, e)\n    def inner():\n        return g(r)\n    return inner()\n",
        bf=drift.bin_fractions,
    )
    assert borrowed(env["f"], FORBIDDEN) == ["bin_fractions"]
    env = _notebook("def f(v, q):\n    return percentile(v, q)\n", percentile=loadtest.percentile)
    assert borrowed(env["f"], {"percentile": loadtest.percentile}) == ["percentile"]


def test_own_code_that_shares_a_reference_name_is_not_borrowing() -> None:
    env = _notebook(
        "def psi(r, c):\n    return sum((b - a) * math.log(b / a) for a, b in zip(r, c))\n"
        "def f(r, c):\n    return psi(r, c)\n"
        "def g(x):\n    return g(x - 1) if x else 0\n"  # recursion terminates the walk
    )
    assert borrowed(env["f"], FORBIDDEN) == []
    assert borrowed(env["g"], FORBIDDEN) == []
    assert borrowed(len, FORBIDDEN) == [], "a builtin has no code to read"


def test_a_graded_function_calling_another_graded_one_is_judged_on_its_own_code() -> None:
    env = _notebook(
        "def build(d):\n    return ref(d)\n"
        "def verify(d, m):\n    return [k for k, v in build(d).items() if m.get(k) != v]\n",
        ref=drift.psi,
    )
    assert borrowed(env["verify"], FORBIDDEN) == ["psi"], "followed by default"
    assert borrowed(env["verify"], FORBIDDEN, graded_elsewhere=(env["build"],)) == []
    assert borrowed(env["build"], FORBIDDEN, graded_elsewhere=(env["build"],)) == ["psi"], "fn itself is read"
