"""Models outside training, on a real pretraining run: `orch export` to a Hugging Face folder that
`transformers` loads with equal logits, `orch generate` with a KV cache, and a fine-tuning job that
starts from a Hugging Face folder. The same for a Llama, on a 2-worker ZeRO-3 run that is resumed at
3 workers beside a job that continues pretraining from its Hugging Face export."""

from __future__ import annotations

import json

import pytest
import torch

from orchestrator import artifacts
from orchestrator.jobs.store import JobStore
from tests.integration.test_checkpoints import SAVE_AT, STEPS, _common, _losses
from tests.integration.test_pipeline import _first_loss_from

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    from tests.conftest import run_orch

    tmp = tmp_path_factory.mktemp("pretrained")
    result = run_orch("run", "pipeline=pretrain", "model=gpt_tiny", "trainer.max_steps=20", "trainer.log_interval=5",
                      "data.num_documents=400", "checkpoint.interval=10", "tracking=none",
                      "--state-dir", str(tmp / "state"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (job,) = JobStore(tmp / "state").list()
    return {"tmp": tmp, "state": tmp / "state", "job": job}


def test_export_loads_in_transformers_with_equal_logits(pretrained, orch, tmp_path):
    transformers = pytest.importorskip("transformers")
    job = pretrained["job"]
    out = tmp_path / "hf"
    result = orch("export", job.id, str(out), "--state-dir", str(pretrained["state"]))
    assert result.returncode == 0, result.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}

    ours = artifacts.build_model(artifacts.load(artifacts.resolve(job.export)))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    idx = torch.randint(0, ours.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(idx)[0] - hf(idx).logits).abs().max().item()
    assert diff < 1e-4

    # The tokenizer comes along and encodes like ours.
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    text = "Mia lives in Paris with a red cat."
    from model.tokenizer import tokenizer_from_json

    assert tok(text)["input_ids"] == tokenizer_from_json((out / "tokenizer.json").read_text()).encode(text).ids

    # Exporting the committed checkpoint (consolidated from the ZeRO shards) gives the same weights
    # as the job's export, and importing the HF folder back gives them too.
    from safetensors.torch import load_file

    out2 = tmp_path / "hf-from-ckpt"
    assert orch("export", job.checkpoint, str(out2)).returncode == 0
    a, b = load_file(str(out / "model.safetensors")), load_file(str(out2 / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    back = artifacts.load(artifacts.resolve(str(out)))
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict[k], v), k


def test_generate_is_deterministic_under_a_seed(pretrained, orch):
    job = pretrained["job"]
    args = ("generate", job.id, "--prompt", "Mia lives in", "--max-new-tokens", "16",
            "--state-dir", str(pretrained["state"]))
    first, again, other = (orch(*args, "--seed", "3"), orch(*args, "--seed", "3"),
                           orch(*args, "--seed", "4", "--temperature", "1.5"))
    assert first.returncode == 0, first.stderr
    assert first.stdout == again.stdout
    assert first.stdout.startswith("Mia lives in") and len(first.stdout) > len("Mia lives in") + 5
    assert other.returncode == 0 and other.stdout != first.stdout
    greedy = orch(*args, "--temperature", "0")
    assert greedy.returncode == 0 and greedy.stdout == orch(*args, "--temperature", "0", "--seed", "9").stdout


def test_finetune_starts_from_a_hugging_face_folder(pretrained, orch, tmp_path):
    job = pretrained["job"]
    hf_dir = tmp_path / "hf"
    assert orch("export", job.id, str(hf_dir), "--state-dir", str(pretrained["state"])).returncode == 0
    state = tmp_path / "state"
    result = orch("run", "pipeline=finetune", f"pipeline.jobs.finetune.init_from={hf_dir}", "model=gpt_tiny",
                  "pipeline.jobs.finetune.trainer.max_steps=6", "pipeline.jobs.finetune.data.num_documents=200",
                  "tracking=none", "--state-dir", str(state))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (fine,) = JobStore(state).list()
    assert fine.state.value == "SUCCEEDED"
    weights = artifacts.load(artifacts.resolve(str(hf_dir))).state_dict
    store = artifacts.resolve(fine.checkpoint).store
    expected = _first_loss_from(weights, fine.config, store, fine.config["data"]["uri"], 2, tmp_path / "cache")
    assert fine.metrics["first_loss"] == pytest.approx(expected, rel=1e-4)
    # The fine-tuning data was tokenized with the folder's tokenizer.
    assert fine.config["data"]["tokenizer_uri"] == f"file://{hf_dir}"


def test_model_mismatch_and_non_models_fail_in_one_line(pretrained, orch, tmp_path):
    job = pretrained["job"]
    hf_dir = tmp_path / "hf"
    assert orch("export", job.id, str(hf_dir), "--state-dir", str(pretrained["state"])).returncode == 0

    def one_line(result, *needles):
        assert result.returncode == 2, (result.stdout, result.stderr)
        lines = [l for l in result.stderr.splitlines() if l.strip()]
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        for n in needles:
            assert n in lines[0], lines[0]

    # Weights of another architecture than the job's model: refused before anything starts.
    one_line(orch("run", "pipeline=finetune", f"pipeline.jobs.finetune.init_from={hf_dir}", "model=gpt_small",
                  "--state-dir", str(tmp_path / "s1")), "does not match model 'gpt_small'", "n_layer")
    # A folder that is not a model.
    (tmp_path / "empty").mkdir()
    one_line(orch("export", str(tmp_path / "empty"), str(tmp_path / "x")), "is not a model")
    one_line(orch("generate", "no-such-job", "--prompt", "hi", "--state-dir", str(pretrained["state"])), "no-such-job")
    # A Hugging Face folder of an architecture orch has no family for.
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}))
    one_line(orch("generate", str(other), "--prompt", "hi"), "'mistral'", "LlamaForCausalLM")
    # A dataset whose tokenizer is larger than the model's vocabulary.
    one_line(orch("run", "model=gpt_tiny", "data.vocab_size=1024", "--dry-run"),
             "data.vocab_size=1024", "model.vocab_size=512")


# --- Llama: the same family-independent machinery, on a 2-worker ZeRO-3 run -----------------------


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A 2-worker ZeRO-3 llama_tiny run (checkpoints at steps 8 and 16) and its `orch export`."""
    from tests.conftest import run_orch

    tmp = tmp_path_factory.mktemp("llama")
    result = run_orch("run", *_common(3, "llama_tiny"), "--state-dir", str(tmp / "state"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (job,) = JobStore(tmp / "state").list()
    exported = run_orch("export", job.id, str(tmp / "hf"), "--state-dir", str(tmp / "state"))
    assert exported.returncode == 0, exported.stderr
    assert "LlamaForCausalLM" in exported.stderr + exported.stdout
    return {"tmp": tmp, "job": job, "hf": tmp / "hf"}


def test_llama_export_is_a_llama_for_causal_lm_with_equal_logits(llama):
    transformers = pytest.importorskip("transformers")
    job = llama["job"]
    ours = artifacts.build_model(artifacts.load(artifacts.resolve(job.export)))
    assert type(ours).__name__ == "Llama" and ours.config.n_kv_head == 2
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(llama["hf"])).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert hf.lm_head.weight.data_ptr() != hf.model.embed_tokens.weight.data_ptr()  # its own head
    idx = torch.randint(0, ours.config.vocab_size, (3, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(idx)[0] - hf(idx).logits).abs().max().item()
    assert diff < 1e-4
    # Importing the folder back gives the consolidated ZeRO-3 weights exactly.
    back = artifacts.load(artifacts.resolve(str(llama["hf"])))
    assert back.model.family == "llama"
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict[k], v), k


@pytest.mark.reliability(category="fault: training",
                         case="a 2-worker ZeRO-3 Llama checkpoint resumed at 3 workers",
                         lost="nothing: the losses match the uninterrupted 2-worker run",
                         happened="converted to a universal checkpoint and continued at step 9 with the same losses")
def test_llama_zero3_resumed_at_three_workers_and_continued_from_its_hf_folder(llama, orch, tmp_path):
    ref, hf_dir = llama["job"], llama["hf"]
    ckpt = ref.checkpoint.rsplit("/step-", 1)[0] + f"/step-{SAVE_AT}"
    # One run, two jobs: the checkpoint resumed at 3 workers, and pretraining continued from the HF folder.
    cont = f"+pipeline.jobs.cont={{kind:pretrain,workers:2,init_from:'{hf_dir}',trainer:{{max_steps:2}}}}"
    # The dataset reuses the folder's tokenizer (the one the checkpoint was trained with, too): an HF
    # folder's weights over a dataset that would train its own tokenizer are refused before start.
    out = orch("run", *_common(3, "llama_tiny"), "pipeline.jobs.pretrain.workers=3",
               f"pipeline.jobs.pretrain.resume_from={ckpt}", cont, f"data.tokenizer_uri={hf_dir}",
               "--state-dir", str(tmp_path / "state"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    jobs = {j.name: j for j in JobStore(tmp_path / "state").list()}

    resumed = jobs["pretrain"]
    assert resumed.state.value == "SUCCEEDED" and resumed.workers == 3
    started = next(h["reason"] for h in resumed.history if h["state"] == "RUNNING")
    assert f"resumed from {ckpt} as a universal checkpoint" in started
    expected, got = _losses(ref), _losses(resumed)
    assert sorted(got) == list(range(SAVE_AT + 1, STEPS + 1))  # it continued at step 9
    for step, loss in got.items():
        assert loss == pytest.approx(expected[step], rel=1e-4), step

    # The continued job's first loss is the HF folder's weights' loss on its first batch.
    fine = jobs["cont"]
    assert fine.state.value == "SUCCEEDED"
    weights = artifacts.load(artifacts.resolve(str(hf_dir))).state_dict
    store = artifacts.resolve(fine.checkpoint).store
    first = _first_loss_from(weights, fine.config, store, fine.config["data"]["uri"], 2, tmp_path / "cache")
    assert fine.metrics["first_loss"] == pytest.approx(first, rel=1e-4)
    assert fine.metrics["first_loss"] < expected[1] - 1.0  # trained weights, not a fresh init (step 1 of the ref)
