"""Roles of multi-role tokens: the rule, and whether paths separate roles (planted structure found,
independent routing gives no excess)."""

from __future__ import annotations

import numpy as np
import pytest

from routelib.errors import ConfigError
from routelib.routing.analyse.roles import (is_multi_role, paired_difference, role_labels, role_separation,
                                            token_class)


def test_token_classes_and_roles():
    assert [token_class(t) for t in ["\n", "  ", "42", " foo", "_x", ":", ""]] == \
        ["newline", "space", "digit", "letter", "letter", "punct", "empty"]
    roles = role_labels([":", ":", "."], ["code", "fiction", "humaneval"], ["\n", " the", "append"])
    assert roles.tolist() == ["code|next:newline", "prose|next:letter", "code|next:letter"]
    assert is_multi_role(" =") and is_multi_role("\n") and not is_multi_role("def")
    with pytest.raises(ConfigError, match="3 tokens, 2 sources"):
        role_labels([":", ":", "."], ["code", "code"], ["\n", " ", "x"])


def _routing(planted: bool, n=600, layers=4, experts=8, seed=0):
    """One token id in two roles; with ``planted``, layers 1-3's first choice jointly encode the role
    (each layer alone only weakly), else every layer is independent of the role."""
    rng = np.random.default_rng(seed)
    role = rng.integers(0, 2, n)
    ex = rng.integers(0, experts, (n, layers, 2))
    if planted:
        a, b = rng.integers(0, 2, n), rng.integers(0, 2, n)
        ex[:, 1, 0] = a  # layer 1 and 2 each look random with respect to the role ...
        ex[:, 2, 0] = b
        ex[:, 3, 0] = 2 + (a ^ b ^ role)  # ... but together with layer 3 they fix it (a parity code)
    return ex, np.zeros(n, int), np.where(role == 1, "code|next:newline", "prose|next:space")


def test_a_planted_path_structure_is_found():
    ex, ids, roles = _routing(planted=True)
    table = role_separation(ex, ids, roles, layers=[1, 2, 3], min_count=10)
    row = table.iloc[0]
    assert row["roles"] == 2 and row["path_excess"] > 0.5 and row["single_excess_max"] < 0.05
    assert paired_difference(table)["mean"] > 0.5


def test_independent_routing_gives_no_excess():
    ex, ids, roles = _routing(planted=False)
    row = role_separation(ex, ids, roles, layers=[0, 1], min_count=10).iloc[0]
    assert abs(row["path_excess"]) < 0.03 and abs(row["single_excess_mean"]) < 0.02


def test_rare_roles_and_tokens_are_left_out():
    ex, ids, roles = _routing(planted=True, n=40)
    assert role_separation(ex, ids, roles, min_count=50).empty
    with pytest.raises(ConfigError, match="no token type"):
        paired_difference(role_separation(ex, ids, roles, min_count=50))
