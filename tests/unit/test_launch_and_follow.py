"""Pure pieces of the job side: squeue's time-left format and the failure report the follower prints."""

import pytest

from hpc.launch import parse_time_left
from hpc.submit import explain_failure


@pytest.mark.parametrize("text,seconds", [("0:59", 59), ("12:00", 720), ("1:02:03", 3723), ("2-01:00:00", 176400),
                                          ("UNLIMITED", None), ("NOT_SET", None), ("", None)])
def test_parse_time_left(text, seconds):
    assert parse_time_left(text) == seconds


def test_failure_report_prefers_sruns_own_words(tmp_path):
    (tmp_path / "7_0_log.err").write_text("srun: error: cpu-2: task 1: Killed\nsrun: Terminating StepId=7.0\n")
    (tmp_path / "7_1_log.err").write_text("")
    assert explain_failure(tmp_path) == ["rank 1 on cpu-2: Killed"]


def test_failure_report_falls_back_to_each_ranks_last_error(tmp_path):
    (tmp_path / "9_0_log.out").write_text("submitit INFO - Starting with JobEnvironment(job_id=9, hostname=node-a, "
                                          "local_rank=0(1))\n")
    (tmp_path / "9_0_log.err").write_text("Traceback (most recent call last):\n[rank0]: ValueError: bad shard\n")
    (tmp_path / "9_1_log.err").write_text("all good\n")
    assert explain_failure(tmp_path) == ["rank 0 on node-a: ValueError: bad shard"]
