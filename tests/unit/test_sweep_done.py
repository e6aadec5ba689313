"""A resume onto a finished sweep is refused, and one that train.max_steps cut says why it cannot go on."""

from pathlib import Path

import pytest

from flora_train.train.sweep import SweepDone, check_not_collapsed


def test_a_finished_sweep_refuses_a_resume_and_a_cut_one_says_it_chose_early():
    ckpt = Path("run/checkpoints/step-00000005")
    check_not_collapsed({"next_step": 5}, ckpt)  # no sweep chose yet: a plain resume
    with pytest.raises(SweepDone) as whole:
        check_not_collapsed({"sweep": {"lr": [0.1], "chosen": {}, "at_step": 36, "plan_end": 36}}, ckpt)
    assert "sweep is done" in str(whole.value) and "max_steps" not in str(whole.value)
    with pytest.raises(SweepDone, match=r"it chose at step 5, where train.max_steps ended it before its plan's end "
                                        r"\(step 36\): a sweep chooses once, so a larger train.max_steps needs "
                                        r"another run_dir"):
        check_not_collapsed({"sweep": {"lr": [0.1], "chosen": {}, "at_step": 5, "plan_end": 36}}, ckpt)
    with pytest.raises(SweepDone):  # a checkpoint from before the steps were recorded
        check_not_collapsed({"sweep": {"lr": [0.1], "chosen": {}}}, ckpt)
