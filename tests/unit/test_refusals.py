"""The catalogue of issue 13, login-node part: each bad input is refused by `hpc.submit` with one line on stderr,
exit code 2, and nothing created. (tests/e2e/test_stops.py has the run-folder owner, Ctrl-C, early-stop and
checkpoint cases, tests/slurm/test_stops_slurm.py the Slurm ones.)"""

import json
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from grpo.config import RANGES, Config, flat_keys, validate
from grpo.data import read_rows, write_rows
from grpo.tiny import build_tokenizer, save_tokenizer
from hpc import claim
from hpc.submit import main

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "grpo" / "sample_data" / "train.parquet"


def refuse(tmp_path, capsys, *args, overrides=(), preset="local", words=()):
    out = tmp_path / "runs"
    argv = ["--preset", preset, "--set", f"out_dir={out}", *args]
    for o in overrides:
        argv += ["--set", o]
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert all(w in err[0] for w in words), err[0]
    assert not out.exists() and captured.out == ""
    return err[0]


# --- 1. numbers out of range --------------------------------------------------------------------------------------

@pytest.mark.parametrize("override", [
    "train.warmup_steps=-1", "train.grad_clip=-1", "train.grad_clip=0", "train.lr=nan", "train.lr=inf",
    "train.lr=-inf", "rollout.temperature=nan", "rollout.temperature=inf", "job.collective_timeout_s=0",
    f"train.seed={2**64}", f"train.seed={2**63}", "train.seed=-1", "job.cpus_per_task=-1", "job.cpus_per_task=0", "job.signal_delay_s=-1",
    "rollout.gpu_memory_utilization=1.5", "job.trainer_fraction=1", "algo.clip_c=1", "algo.adv_eps=0",
    "algo.kl_coef=-0.1", "train.weight_decay=nan", "job.time_limit_min=0", "train.max_bad_steps=0",
    "train.keep_checkpoints=-1", "model.lora_rank=-1", "train.max_tokens_per_gpu=-5", "job.host_mem_gb=-1",
    "algo.entropy_coef=nan", "algo.clip_low=1", "job.write_gbps=0", "train.checkpoint_every=-1",
    "rollout.max_num_seqs=0", "data.max_prompt_len=0",
])
def test_a_number_out_of_its_range(tmp_path, capsys, override):
    key = override.split("=")[0]
    line = refuse(tmp_path, capsys, overrides=[override], words=[key, "out of range", RANGES[key]])
    assert override.split("=")[1] in line


def test_every_numeric_field_has_a_range():
    """A new int or float field without a row in RANGES would pass unchecked: the table must stay complete."""
    numeric = {k for k, hint in flat_keys(Config()).items()
               if hint in (int, float) or float in typing.get_args(hint) or int in typing.get_args(hint)}
    assert numeric == set(RANGES), (numeric ^ set(RANGES))
    validate(Config())  # the defaults pass


def test_a_time_limit_shorter_than_the_signal_delay(tmp_path, capsys):
    refuse(tmp_path, capsys, overrides=["job.time_limit_min=1", "job.signal_delay_s=60"],
           words=["job.signal_delay_s=60", "job.time_limit_min=1"])


def test_a_signal_lead_time_too_short_for_the_checkpoint(tmp_path, capsys):
    """72B full fine-tuning: 0.9 TB of parameters and AdamW states; 120 s at 1 GB/s per node cannot save it."""
    sinfo = tmp_path / "cluster.txt"
    sinfo.write_text("NODELIST|PARTITION|STATE|STATE|GRES|GRES_USED|CPUS|MEMORY|AVAIL|TIMELIMIT|REASON\n" + "".join(
        f"g{i}|h800*|idle|idle|gpu:h800:8|gpu:h800:0(IDX:N/A)|64|1024000|up|infinite|none\n" for i in range(4)))
    line = refuse(tmp_path, capsys, "--dry-run", "--cluster-file", str(sinfo), preset="h800x32",
                  overrides=["job.signal_delay_s=120"], words=["job.signal_delay_s=120", "too short", "872 GB"])
    need = int(line.split("set job.signal_delay_s=")[1].split()[0])
    assert 120 < need <= 900  # the preset's own 900 s passes (it covers a split plan: 2 trainer nodes)
    assert main(["--preset", "h800x32", "--dry-run", "--cluster-file", str(sinfo),
                 "--set", f"out_dir={tmp_path / 'runs'}"]) == 0


# --- 2. control characters ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("override", [
    "out_dir=x\ntouch pwned\n#", "name=a\nb", "job.partition=cpu\n#SBATCH --uid=0", "model.path=tiny\t",
    "data.train_path=a\rb", "job.gpu_type=h800\x1b[2J", "model.arch=\x7f", "data.task=repeat\x00",
])
@pytest.mark.parametrize("preset", ["local", "cpu-slurm"])
def test_control_characters_in_a_text_field(tmp_path, capsys, monkeypatch, override, preset):
    monkeypatch.chdir(tmp_path)
    refuse(tmp_path, capsys, "--dry-run", preset=preset, overrides=[override],
           words=[override.split("=")[0], "control character"])
    assert list(tmp_path.iterdir()) == []  # no `pwned`, no run folder


def test_control_characters_in_the_run_dir(tmp_path, capsys):
    refuse(tmp_path, capsys, "--run-dir", str(tmp_path / "r\ntouch pwned"), words=["--run-dir", "control character"])
    assert list(tmp_path.iterdir()) == []


# --- 3. inputs that would fail only after the queue wait ----------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from grpo.tiny import build_tiny_model

    path = tmp_path_factory.mktemp("tiny-model")
    build_tiny_model(0).save_pretrained(path, safe_serialization=True)
    save_tokenizer(build_tokenizer(), path)
    return path


def copy_model(model_dir: Path, dest: Path, skip=()) -> Path:
    dest.mkdir()
    for f in model_dir.iterdir():
        if f.name not in skip:
            (dest / f.name).write_bytes(f.read_bytes())
    return dest


def dataset_args(model: Path, data: Path, *more: str) -> list[str]:
    return [f"model.path={model}", "data.task=dataset", f"data.train_path={data}", *more]


def test_a_dataset_smaller_than_one_step(tmp_path, capsys, model_dir):
    data = tmp_path / "d.parquet"
    write_rows(data, read_rows(SAMPLE)[:5])
    refuse(tmp_path, capsys, overrides=dataset_args(model_dir, data, "data.max_prompt_len=512"),
           words=["5 usable prompts", "data.prompts_per_step=8"])


def test_a_data_source_without_a_reward_function(tmp_path, capsys, model_dir):
    rows = read_rows(SAMPLE)[:8]
    rows[3] = {**rows[3], "data_source": "my/own-task"}
    data = tmp_path / "d.jsonl"
    write_rows(data, rows)
    refuse(tmp_path, capsys, overrides=dataset_args(model_dir, data, "data.max_prompt_len=512"),
           words=["'my/own-task'", "no built-in scorer", "reward.function="])


def test_an_empty_prompt(tmp_path, capsys, model_dir):
    rows = read_rows(SAMPLE)[:8]
    rows[2] = {**rows[2], "prompt": [{"role": "user", "content": "  "}]}
    data = tmp_path / "d.jsonl"
    write_rows(data, rows)
    refuse(tmp_path, capsys, overrides=dataset_args(model_dir, data, "data.max_prompt_len=512"),
           words=["1 empty prompt", "row 2"])


def test_a_model_folder_without_tokenizer_files(tmp_path, capsys, model_dir):
    bare = copy_model(model_dir, tmp_path / "bare", skip=("tokenizer.json", "tokenizer_config.json",
                                                          "special_tokens_map.json"))
    refuse(tmp_path, capsys, overrides=[f"model.path={bare}"], words=["no tokenizer files", "tokenizer.json"])


@pytest.mark.parametrize("cut", [0, 5, 100, -10])
def test_an_empty_or_cut_off_safetensors_file(tmp_path, capsys, model_dir, cut):
    model = copy_model(model_dir, tmp_path / "m")
    weights = next(model.glob("*.safetensors"))
    data = weights.read_bytes()
    weights.write_bytes(data[:cut] if cut >= 0 else data[:cut])
    refuse(tmp_path, capsys, overrides=[f"model.path={model}"], words=[weights.name, "not a complete safetensors"])


# --- 7. failures that must name their cause, login side -----------------------------------------------------------

def test_an_invalid_config_json_on_resume(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    for text in ("{not json", "[1, 2]"):
        (run / "config.json").write_text(text)
        line = refuse(tmp_path, capsys, "--run-dir", str(run), "--resume", words=["config.json", "another --run-dir"])
        assert "Traceback" not in line
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]


@pytest.fixture
def read_only_dir(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a read-only tmpfs needs root")
    where = tmp_path / "ro"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(where)], check=True)
    yield where
    subprocess.run(["umount", str(where)], check=True)


def test_a_read_only_run_dir(read_only_dir, capsys):
    for args in (["--run-dir", str(read_only_dir / "r")], ["--set", f"out_dir={read_only_dir / 'runs'}"]):
        assert main(["--preset", "local", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "Read-only file system" in err[0] and "writable" in err[0], err
    assert list(read_only_dir.iterdir()) == []


def test_a_huge_hostlist_in_a_cluster_file(tmp_path, capsys):
    sinfo = tmp_path / "cluster.txt"
    sinfo.write_text("NODELIST|PARTITION|STATE|STATE|GRES|GRES_USED|CPUS|MEMORY|AVAIL|TIMELIMIT|REASON\n"
                     "h800-[1-99999999]|h800*|idle|idle|gpu:h800:8|gpu:h800:0(IDX:N/A)|64|1024000|up|infinite|none\n")
    refuse(tmp_path, capsys, "--cluster-file", str(sinfo), preset="h800x32",
           words=["h800-[1-99999999]", "more than 100000 hosts"])


# --- 4. one owner per run folder (the claim itself; the races through the CLI are in tests/e2e) -----------------

def test_a_claim_held_by_a_live_process_refuses_a_second_one(tmp_path):
    claim.claim(tmp_path, executor="local")
    with pytest.raises(ValueError, match="in use by the launch with pid"):
        claim.claim(tmp_path, executor="local")
    claim.release(tmp_path)
    claim.claim(tmp_path, executor="local")  # given back: free again


def test_a_stale_claim_is_taken_over(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / claim.CLAIM).write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid, "start": "1",
                                                    "executor": "local", "job_id": str(dead.pid)}))
    claim.claim(tmp_path, executor="local")
    assert "no longer runs; taking it over" in capsys.readouterr().err
    assert json.loads((tmp_path / claim.CLAIM).read_text())["pid"] == os.getpid()
    (tmp_path / claim.CLAIM).write_text('{"host": ')  # not JSON: no owner to ask, so stale
    claim.claim(tmp_path, executor="local")
    assert "an unreadable claim" in capsys.readouterr().err


def test_a_claim_from_another_host_is_not_guessed(tmp_path):
    (tmp_path / claim.CLAIM).write_text(json.dumps({"host": "elsewhere", "pid": 1, "executor": "local",
                                                    "job_id": "1"}))
    with pytest.raises(ValueError, match="cannot be checked from here; if it no longer runs, delete"):
        claim.claim(tmp_path, executor="local")


@pytest.mark.parametrize("stale", [False, True])
def test_two_claims_at_once_one_wins(tmp_path, stale):
    """Eight processes claim one folder at the same moment, free or held by a dead job: exactly one succeeds."""
    if stale:
        (tmp_path / claim.CLAIM).write_text(json.dumps({"host": os.uname().nodename, "pid": 2**22 + 7,
                                                        "start": "1", "executor": "local", "job_id": "4194311"}))
    code = ("import sys, time; from hpc import claim\n"
            "time.sleep(max(0, float(sys.argv[2]) - time.time()))\n"
            "try:\n    claim.claim(sys.argv[1], executor='local'); print('won'); time.sleep(2)\n"
            "except ValueError: print('lost')\n")
    import time

    start = str(time.time() + 3)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), start], stdout=subprocess.PIPE, text=True,
                              env=env) for _ in range(8)]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert sorted(outs) == ["lost"] * 7 + ["won"], outs



# --- 8. the end of the run inside the deadline logic --------------------------------------------------------------

def test_the_export_runs_only_when_it_ends_before_the_limit():
    """grpo.stop.end_fits: the export's estimate (half again as margin) must end before deadline + lead time."""
    import time

    from grpo import stop

    try:
        stop.set_deadline(None)
        assert stop.end_fits(1e9, 0)  # no limit known (a local run without a deadline): always
        stop.set_deadline(time.time() + 60)
        assert stop.end_fits(100, 120)  # 150 s of 180 s left
        assert not stop.end_fits(130, 120)  # 195 s > 180 s: skipped, grpo.export later
        stop.set_deadline(time.time() - 100)  # the deadline passed during the last step: 20 s left
        assert stop.end_fits(10, 120) and not stop.end_fits(20, 120)
    finally:
        stop.set_deadline(None)


def test_a_killed_rank_is_named_first_only_when_its_peers_just_lost_it(tmp_path):
    from hpc.submit import explain_failure

    head = "submitit INFO - Starting with JobEnvironment(job_id=5, hostname=vm, local_rank={r}(2))\n"
    for r in (0, 1):
        (tmp_path / f"5_{r}_log.out").write_text(head.format(r=r))
    (tmp_path / "5_0_result.pkl").write_bytes(b"x")
    (tmp_path / "5_0_log.err").write_text("RuntimeError: Read error [127.0.0.1]:5791: Connection reset by peer\n")
    (tmp_path / "5_1_log.err").write_text("")  # no error, no result: SIGKILLed
    lines = explain_failure(tmp_path)
    assert lines[0].startswith("rank 1 on vm: killed by a signal") and "Connection reset" in lines[1]
    (tmp_path / "5_0_log.err").write_text("ValueError: bad shard\n")  # a cause of its own: it stays first
    assert explain_failure(tmp_path)[0] == "rank 0 on vm: ValueError: bad shard"
