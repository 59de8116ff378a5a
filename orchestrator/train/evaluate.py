"""A job of kind `eval`: the numbers of given weights, with no optimizer and no checkpoint.

Each Ray Train worker loads the weights (the dependency's export, or `init_from`: an export, a
checkpoint or a Hugging Face folder; random ones with `from_scratch`) into the plain model, and
computes its share of what `trainer.eval_metrics` names; the ranks' shares are combined, so the
numbers do not depend on the worker count. The metrics are functions of (evaluator, model, step)
in `METRICS`: one more is one more function there and its name in `config.schema.EVAL_METRICS`.
Rank 0 logs them to the job's metrics history (at the step the weights were trained to, when it is
known) and writes them to `runs/<job>/eval.json`, where the runner reads them for the job record.
The same weights with the same config give the same numbers: the validation batches are fixed and
decoding is greedy.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Callable

import torch

from model.registry import family_of
from orchestrator.checkpoint.layout import step_of
from orchestrator.config.schema import EVAL_METRICS
from orchestrator.constants import EVAL_RESULT, EXPORT_MANIFEST
from orchestrator.data.manifest import load_manifest
from orchestrator.data.reader import SplitReader
from orchestrator.errors import OrchError
from orchestrator.storage import join_uri
from orchestrator.train.heartbeat import EVAL
from orchestrator.train.loop import Trainer, TrainerState, run_worker
from orchestrator.train.reports import Evaluated

log = logging.getLogger("orchestrator.train")


def eval_worker(args: dict) -> None:
    """Entry point of each Ray Train worker of an eval job (see `train_worker`)."""
    run_worker(args, Evaluator)


def weights_step(store, uri: str | None) -> int:
    """The training step of the weights at `uri`: a checkpoint's (its path), an orch export's (its
    manifest); 0 for other weights (a Hugging Face folder) or none."""
    if not uri:
        return 0
    try:
        return step_of(uri)  # a checkpoint folder, .../step-N
    except OrchError:
        pass
    try:
        return int(json.loads(store.get(join_uri(uri, EXPORT_MANIFEST))).get("step") or 0)
    except (OrchError, ValueError, TypeError):  # not an orch export
        return 0


class Evaluator(Trainer):
    """One worker of an eval job: builds the model with the given weights, computes the metrics."""

    def run(self) -> None:
        from deepspeed.accelerator import get_accelerator  # (after train_worker set DS_ACCELERATOR)

        job = self.job
        self._begin_attempt()
        self.device = get_accelerator().current_device_name()
        manifest = load_manifest(self.store, job.data.uri)
        self.val = SplitReader.from_config(self.store, job.data, manifest, "val",
                                           self.scratch / "cache" / f"rank-{self.rank}")
        self.tokenizer = self.store.get(join_uri(job.data.uri, manifest.tokenizer_key))
        model = self._model().to(self.device).eval()
        step = weights_step(self.store, self.spec.init_from)
        log.info("rank %d of %d on %s: evaluating %s (step %d): %s", self.rank, self.world, self.device,
                 self.spec.init_from or "random weights", step, ", ".join(job.trainer.eval_metrics))
        self._open_history(TrainerState(step=step), "first")
        self.hb.start(step)  # (the runner's watchdog sees an eval that hangs too)
        self.hb.phase(EVAL)
        try:
            results: dict = {"step": step, "weights": self.spec.init_from or "random", "at": time.time()}
            for name in job.trainer.eval_metrics:
                results.update(METRICS[name](self, model, step))
            if self.rank == 0:
                self.store.put(join_uri(self.spec.run_uri, EVAL_RESULT), json.dumps(results, indent=1).encode())
            if results.get("eval_loss") is not None:
                self._report(Evaluated(eval_loss=results["eval_loss"]))
        finally:
            self.hb.close()
            self.val.close()
            self.history.finish()

    def _model(self) -> torch.nn.Module:
        torch.manual_seed(self.job.trainer.seed)
        model = family_of(self.job.model).build(self.job.model)
        if self.spec.init_from:
            model.load_state_dict(self._initial_weights(self.spec.init_from))
        return model

    def _loss(self, model: torch.nn.Module, step: int) -> dict:
        loss = self._logged_eval(model, self.val, step)
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}

    def _qa(self, model: torch.nn.Module, step: int) -> dict:
        score = self._heldout_qa(model, step, self.val.manifest.eot_id)
        if score is None:
            return {}
        return {"qa_correct": score.correct, "qa_questions": score.questions}


METRICS: dict[str, Callable[[Evaluator, torch.nn.Module, int], dict]] = {
    "loss": Evaluator._loss,
    "qa_exact_match": Evaluator._qa,
}
assert set(METRICS) == set(EVAL_METRICS), "config.schema.EVAL_METRICS names what METRICS computes"
