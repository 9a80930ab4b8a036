"""routelib.routing.record.olmoe_analysis: the safe reader of the OLMoE routing-analysis pickles. A pickle
that would run code is refused; every published file present on this machine reads (the data is not in
the repository: the test looks beside it, or at $ROUTELIB_OLMOE_ROUTING, and skips when absent)."""

import collections
import os
import pickle

import numpy as np
import pytest

from routelib import paths
from routelib.routing.record import olmoe_analysis as O

def published_root():
    """$ROUTELIB_OLMOE_ROUTING, else a copy of the published folder in a checkout beside this repository
    (``<sibling>/anchors/olmoe-routing/routing_output``), else skip."""
    beside = sorted(paths.REPO_ROOT.parent.glob("*/anchors/olmoe-routing/routing_output"))
    root = os.environ.get(O.ENV) or (beside[0] if beside else None)
    if root is None:
        pytest.skip(f"the OLMoE routing-analysis data is not on this machine: {O.WHERE}")
    return root


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/routelib-pwned",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps([collections.Counter({1: 2}), RunsCode()]))
    with pytest.raises(O.UnsafePickleError, match=r"evil.pkl: refuses (posix|os)\.system"):
        O.safe_load(path)
    assert not os.path.exists("/tmp/routelib-pwned")


def test_what_the_files_hold_round_trips(tmp_path):
    layers = [collections.Counter({np.int64(3): 5, np.int64(1): 2}) for _ in O.LAYERS]
    crossing = [collections.Counter({(np.int64(1), np.int64(2)): 4}) for _ in O.LAYERS[1:]]
    tokens = [collections.defaultdict(collections.Counter, {np.int64(3): collections.Counter({np.int64(42): 7})})
              for _ in O.LAYERS]
    for kind, obj in (("expert_counts", layers), ("expert_counts_crosslayer_top1", crossing), ("eid2token", tokens)):
        (tmp_path / "mistral" / kind).mkdir(parents=True)
        (tmp_path / "mistral" / kind / "c4.pkl").write_bytes(pickle.dumps(obj))
    counts = O.expert_counts(tmp_path, "mistral", "c4")
    assert counts[counts["layer"] == 7].set_index("expert")["count"].to_dict() == {1: 2, 3: 5}
    assert O.transitions_top1(tmp_path, "mistral", "c4")[["from_layer", "to_layer", "count"]].values.tolist() == [
        [0, 7, 4], [7, 15, 4]]
    assert O.expert_tokens(tmp_path, "mistral", "c4")["token_id"].tolist() == [42, 42, 42]


def test_truncated_and_missing_files_are_one_clear_error(tmp_path):
    (tmp_path / "bad.pkl").write_bytes(pickle.dumps([1, 2, 3])[:-3])
    with pytest.raises(O.UnsafePickleError, match="not a readable"):
        O.safe_load(tmp_path / "bad.pkl")
    with pytest.raises(O.AnalysisDataMissing, match="allenai/OLMoE"):
        O.find_root(tmp_path)


def test_every_published_file_present_reads():
    root = published_root()
    files = O.available(root)
    assert len(files) >= 40 and set(files["model"]) >= {"olmoe", "mistral"}
    for row in files.itertuples():
        obj = O.safe_load(row.path)
        assert isinstance(obj, list) and len(obj) in (2, 3), row.path
    mix = O.expert_counts(root, "mistral", "arxiv")
    assert sorted(mix["layer"].unique()) == [0, 7, 15] and mix["expert"].between(0, 7).all()
    assert mix.groupby("layer")["count"].sum().eq(208_896 * 2).all()  # every token's two choices
    top1 = O.transitions_top1(root, "olmoe", "github")
    assert top1.groupby("from_layer")["count"].sum().eq(208_896).all()
