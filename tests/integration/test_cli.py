"""The `orch` command line on bad input: one clear line, exit code 2, no traceback (unless --debug).
These run the real CLI in a child process; none of them gets as far as starting Ray."""

from __future__ import annotations

import pytest


def _one_line_error(result, *needles: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.mark.reliability(category="config", case="bad override `{override}`", lost="nothing: no job recorded")
@pytest.mark.parametrize(
    "override, needles",
    [
        ("model=nope", ["'nope'", "model", "gpt_tiny", "gpt_small"]),
        ("trainer.max_steps=abc", ["trainer.max_steps", "'abc'", "integer"]),
        ("trainer.max_steps", ["trainer.max_steps", "key=value"]),
        ("deepspeed.stage=4", ["deepspeed.stage", "1, 2, 3", "4"]),
        ("trainer.bogus=1", ["trainer.bogus", "max_steps"]),
        ("+trainer.bogus=1", ["trainer.bogus", "max_steps"]),
        ("deepspeed=zero9", ["zero9", "zero1", "zero3"]),
        ("pipeline.jobs.pretrain.workers=3", ["global_batch_size", "3"]),
        ("data.seq_len=1000", ["data.seq_len=1000", "block_size"]),
        ("storage=s3 storage.root=/tmp/x", ["root", "s3://"]),
        ("storage=gcs", ["'gcs'", "storage", "local, s3"]),
        ("pipeline.jobs.pretrain.workers=[4,2]", ["workers=[4, 2]", "MIN <= MAX"]),
        ("trainer.lr=1e-3,3e-3", ["trainer.lr=1e-3,3e-3", "-m", "key=[a,b]"]),
    ],
)
def test_bad_overrides_fail_in_one_line(orch, tmp_path, override, needles):
    result = orch("run", *override.split(), "--state-dir", str(tmp_path / "state"))
    _one_line_error(result, *needles)
    assert not (tmp_path / "state" / "jobs.db").exists()  # nothing was submitted


@pytest.mark.reliability(category="command line", case="--debug with a bad override", lost="nothing",
                         happened="the traceback is shown (only with --debug)")
def test_debug_shows_the_traceback(orch, tmp_path):
    result = orch("--debug", "run", "model=nope", "--state-dir", str(tmp_path))
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_dry_run_prints_config_and_resources_and_starts_nothing(orch, tmp_path):
    result = orch("run", "model=gpt_tiny", "trainer.max_steps=40", "deepspeed=zero3", "--dry-run",
                  "--state-dir", str(tmp_path / "state"))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "name: gpt_tiny" in out and "max_steps: 40" in out and "stage: 3" in out
    assert "pretrain: pretrain, 2 workers x {CPU: 1} = {CPU: 2}" in out
    assert "ZeRO-3" in out and "after pretrain" in out
    assert not (tmp_path / "state").exists()


def test_sweep_dry_run_lists_each_combination_and_submits_nothing(orch, tmp_path):
    state = tmp_path / "state"
    result = orch("submit", "-m", "trainer.lr=1e-3,3e-3", "model=gpt_tiny,gpt_small", "trainer.max_steps=5",
                  "--dry-run", "--state-dir", str(state))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "# sweep: 4 pipeline(s), one per combination; nothing submitted" in out
    for i, combo in enumerate(["trainer.lr=0.001 model=gpt_tiny", "trainer.lr=0.001 model=gpt_small",
                               "trainer.lr=0.003 model=gpt_tiny", "trainer.lr=0.003 model=gpt_small"], 1):
        assert f"# {i}/4: {combo} trainer.max_steps=5\n# resources" in out
    assert out.count("pretrain: pretrain, 2 workers") == 4 and out.count("5 steps") == 4
    assert not state.exists()

    _one_line_error(orch("submit", "-m", "trainer.lr=range(1,1)", "--dry-run", "--state-dir", str(state)),
                    "trainer.lr=range(1,1)", "no values")
    # `orch retry` without a cluster says how an `orch run` job continues
    _one_line_error(orch("retry", "p000000-pretrain", "--state-dir", str(state)),
                    "no cluster to retry job p000000-pretrain", "`orch run --resume`")


@pytest.mark.reliability(category="job id", case="status without records, then of an unknown job id", lost="nothing")
def test_status_without_records_and_unknown_job(orch, tmp_path):
    _one_line_error(orch("status", "--state-dir", str(tmp_path / "none")), "no job records", "--state-dir")
    from orchestrator.jobs.store import JobStore

    JobStore(tmp_path / "state")  # an empty job database
    _one_line_error(orch("status", "nope-123", "--state-dir", str(tmp_path / "state")), "nope-123", "orch status")


@pytest.mark.reliability(category="state folder", case="--state-dir with commas, brackets and a quote", lost="nothing",
                         happened="taken literally (quoted for Hydra by the CLI)")
def test_state_dir_with_commas_and_quotes_is_taken_literally(orch, tmp_path):
    odd = tmp_path / "a,b [c] it's"
    result = orch("run", "--dry-run", "--state-dir", str(odd), "model=gpt_tiny")
    assert result.returncode == 0, result.stderr
    assert f"state_dir: {odd}" in result.stdout


def test_console_script_is_installed(tmp_path):
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    script = Path(sys.executable).parent / "orch"
    assert script.exists() or shutil.which("orch")
    out = subprocess.run([str(script if script.exists() else "orch"), "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("orch ")


def test_version_and_module_entry_point(orch):
    result = orch("--version")
    assert result.returncode == 0 and result.stdout.startswith("orch ")


@pytest.mark.reliability(category="command line", case="unknown command", lost="nothing",
                         happened="argparse's usage error, exit 2")
def test_unknown_command_is_a_usage_error(orch):
    result = orch("frobnicate")
    assert result.returncode == 2 and "invalid choice" in result.stderr


@pytest.mark.reliability(category="storage", case="storage=s3 with a bucket that does not exist", lost="nothing")
def test_missing_bucket_fails_fast(orch, tmp_path, s3_server):
    result = orch("run", "storage=s3", "storage.root=s3://no-such-bucket-xyz/orch",
                  f"storage.endpoint_url={s3_server.endpoint_url}", "--state-dir", str(tmp_path / "state"))
    _one_line_error(result, "no-such-bucket-xyz", "storage.root")


@pytest.mark.reliability(category="storage", case="storage=s3 without credentials", lost="nothing",
                         happened="one line naming AWS_ACCESS_KEY_ID (never a key's value); exit 2")
def test_missing_credentials_named_without_values(orch, tmp_path, s3_server):
    bucket = s3_server.make_bucket("creds")
    empty = tmp_path / "empty"
    empty.write_text("")
    env = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_SHARED_CREDENTIALS_FILE": str(empty),
           "AWS_CONFIG_FILE": str(empty)}
    result = orch("run", "storage=s3", f"storage.root=s3://{bucket}/orch",
                  f"storage.endpoint_url={s3_server.endpoint_url}", "--state-dir", str(tmp_path / "state"), env=env)
    _one_line_error(result, "AWS_ACCESS_KEY_ID")


@pytest.mark.slow
def test_run_sweep_trains_each_combination_in_one_cluster(orch, tmp_path):
    """`orch run -m`: one pipeline per combination, in one embedded cluster, grouped by the sweep's
    id (W&B group and status), each with its own overrides; side by side when they fit (two
    1-worker jobs on 2 CPUs), preparing their one dataset once."""
    state = tmp_path / "state"
    result = orch("run", "-m", "trainer.lr=1e-3,3e-3", "pipeline=pretrain", "model=gpt_tiny",
                  "pipeline.jobs.pretrain.workers=1", "trainer.max_steps=4", "trainer.log_interval=1",
                  "data.num_documents=200", "tracking=none", "--state-dir", str(state), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    jobs = result.status(state)
    assert len(jobs) == 2 and all(j["state"] == "SUCCEEDED" and j["metrics"]["step"] == 4 for j in jobs), jobs
    assert len({j["pipeline_id"] for j in jobs}) == 2
    sweeps = {j["sweep"]["id"] for j in jobs}
    assert len(sweeps) == 1 and all(j["wandb"]["group"] == next(iter(sweeps)) for j in jobs)
    assert sorted(j["sweep"]["overrides"][0] for j in jobs) == ["trainer.lr=0.001", "trainer.lr=0.003"]
    from orchestrator.jobs.store import JobStore

    assert sorted(JobStore(state).get(j["id"]).config["trainer"]["lr"] for j in jobs) == [1e-3, 3e-3]
    # Side by side: each started before the other ended.
    spans = [(next(h["at"] for h in j["history"] if h["state"] == "STARTING"),
              next(h["at"] for h in j["history"] if h["state"] == "SUCCEEDED")) for j in jobs]
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1], spans
    # Both need one dataset (data.uri): one job prepares it, the other waits and uses it (prepared at
    # once into one folder, one's clearing of leftovers deleted the other's shards).
    assert result.stdout.count("training a 512-token byte-level BPE tokenizer") == 1, result.stdout[-3000:]
    assert result.stdout.count("using the prepared dataset") == 1, result.stdout[-3000:]
