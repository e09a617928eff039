"""Reliability: numeric faults skip steps; too many in a row stop the run with the last good
state saved."""

import math

import pytest

from megalong.errors import MegalongError
from megalong.spawn import run_on_ranks
from test_training import train_args, train_layouts


@pytest.mark.slow
def test_non_finite_loss_skips_the_step_and_too_many_stop_the_run(tiny_megatron_ckpt, corpus,
                                                                  sp_model, tmp_path):
    base = train_args(tiny_megatron_ckpt, corpus, sp_model, "--lr-warmup-iters", "0")
    (clean,), = run_on_ranks(train_layouts, 1, [base])
    (with_nan,), = run_on_ranks(train_layouts, 1, [base], env={"MEGALONG_FAULT_NAN_LOSS": "2"})
    assert math.isnan(with_nan[2]) and not any(math.isnan(x) for x in with_nan[:2] + with_nan[3:])
    assert with_nan[:2] == clean[:2]
    # The skipped step left the weights alone: step 3 sees the weights after step 1, so it
    # differs from the clean run, which has taken one more update by then.
    assert with_nan[3] != clean[3]

    save = str(tmp_path / "stopped")
    with pytest.raises(MegalongError, match="3 steps in a row had a non-finite loss"):
        run_on_ranks(train_layouts, 1, [base + ["--max-skipped-steps", "2", "--save", save]],
                     env={"MEGALONG_FAULT_NAN_LOSS": "1,2,3"})
    from megalong.checkpoint_meta import latest_iteration

    assert latest_iteration(save) == 4
