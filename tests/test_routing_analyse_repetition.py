"""routelib.routing.analyse.repetition: repeated n-gram masks and repetition rates of trace sets."""

import numpy as np
import pandas as pd
import pytest

from routelib.routing.analyse.repetition import repeated_ngram_mask, repetition_by_problem, repetition_rate


def test_mask_marks_every_token_of_a_repeated_ngram_and_nothing_else():
    seq = np.array([9, 1, 2, 3, 4, 1, 2, 3, 4, 7])  # "1 2 3 4" twice
    assert repeated_ngram_mask(seq, 4).tolist() == [False] + [True] * 8 + [False]
    assert not repeated_ngram_mask(np.arange(20), 4).any()
    assert repeated_ngram_mask(np.array([5] * 6), 4).all()  # a loop of one token
    assert not repeated_ngram_mask(np.array([1, 2, 1]), 4).any()  # shorter than n
    assert repeated_ngram_mask(np.array([1, 2, 1]), 1).tolist() == [True, False, True]
    with pytest.raises(ValueError, match="n must be >= 1"):
        repeated_ngram_mask(seq, 0)


def test_rates_count_generated_tokens_only_per_problem():
    rows = []
    for pid, ds, prompt, gen in [("a", "x", [1, 2, 3, 4], [1, 2, 3, 4]),  # repeats the prompt only: not counted
                                 ("b", "x", [0], [5, 6, 7, 8, 5, 6, 7, 8]),
                                 ("c", "y", [0], [1, 2, 3, 4, 5])]:
        for pos, t in enumerate(prompt + gen):
            rows.append({"dataset": ds, "problem_id": pid, "position": pos, "token_id": t,
                         "phase": "prompt" if pos < len(prompt) else "generated"})
    df = pd.DataFrame(rows).sample(frac=1, random_state=0)  # order must not matter
    per = repetition_by_problem(df).set_index("problem_id")
    assert per["repeated_tokens"].to_dict() == {"a": 0, "b": 8, "c": 0}
    table = repetition_rate(df)
    assert table.loc["x", "generated_tokens"] == 12 and table.loc["x", "repetition_rate"] == pytest.approx(8 / 12)
    assert table.loc["all", "repetition_rate"] == pytest.approx(8 / 17)
