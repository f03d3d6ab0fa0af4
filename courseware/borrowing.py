"""Hidden-test helper: does a trainee's function call the reference implementation it was asked to write itself?

An exercise such as "write the PSI yourself" is graded by comparing with an independent oracle in the hidden test,
which a one-line call of ``reference_impl``'s own function would pass. :func:`borrowed` finds such calls by reading
the function's code (its names, the functions nested in it, and the notebook functions it calls), so the hidden test
can fail with a message that says what to do. A trainee's own helper that merely shares a reference name (``psi``,
``percentile``) is not a borrowing: only the very same function object counts.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from typing import Any


def _names(code: types.CodeType) -> set[str]:
    names, stack = set(), [code]
    while stack:
        c = stack.pop()
        names |= set(c.co_names) | set(c.co_freevars)
        stack += [k for k in c.co_consts if isinstance(k, types.CodeType)]
    return names


def _contents(cell: types.CellType) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # a closure variable not assigned yet
        return None


def borrowed(
    fn: Callable[..., Any],
    forbidden: Mapping[str, Any],
    modules: tuple[types.ModuleType, ...] = (),
    graded_elsewhere: tuple[Callable[..., Any], ...] = (),
) -> list[str]:
    """The ``forbidden`` functions (name -> object) that ``fn`` reaches, sorted; empty when it reaches none.

    Reached means: a global name of ``fn`` (or of a function nested in it, or of another function defined in the same
    notebook that it calls, at any depth) is bound to a forbidden object, or names one of ``modules`` while an
    attribute of that name is used (``drift.psi(...)``). ``graded_elsewhere``: the trainee's other graded functions
    that ``fn`` may call (e.g. ``verify_manifest`` calling ``build_manifest``): not followed, so a borrowing is held
    against the function that does it, once.
    """
    found: set[str] = set()
    seen: set[int] = {id(g.__code__) for g in graded_elsewhere if g is not fn and hasattr(g, "__code__")}
    todo = [fn]
    while todo:
        f = todo.pop()
        code = getattr(f, "__code__", None)
        if code is None or id(code) in seen:
            continue
        seen.add(id(code))
        names = _names(code)
        env = getattr(f, "__globals__", {})
        closure = {name: _contents(cell) for name, cell in zip(code.co_freevars, f.__closure__ or (), strict=True)}
        for name in names:
            value = closure.get(name, env.get(name))
            for label, target in forbidden.items():
                if value is target:
                    found.add(label)
            if any(value is m for m in modules):
                found |= {label for label in forbidden if label in names}
            # A helper the trainee wrote in the notebook (same globals): follow it.
            if isinstance(value, types.FunctionType) and value.__globals__ is env:
                todo.append(value)
    return sorted(found)
