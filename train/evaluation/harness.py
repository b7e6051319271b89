"""lm-evaluation-harness on our Llama: `HarnessModel` is an `lm_eval.api.model.LM` that scores and
generates with the model and the run's own tokenizer, so `launch/eval.py tasks=...` runs lm-eval's tasks
(hub tasks where their datasets are cached, or local task YAMLs over local files) without exporting.

Scoring is the training loss's: a continuation's log-likelihood is minus the summed cross-entropy of its
tokens, given BOS + the context (the context cut from the left to fit model.max_seq_len).

A fine-tuned (chat) model is asked as it was trained: with a ChatEncoder, lm-eval renders each context as a user
turn with the run's chat template and its generation prompt (apply_chat_template=True), and the rendered text,
which starts with whatever the template starts with (BOS), is tokenized with its special tokens as one id each.
"""

import logging

import torch
import torch.nn.functional as F

from .greedy import generate_together, request

log = logging.getLogger("train")


def harness_model(model, tokenizer, device, chat=None, forward=None, pipeline=None, rows: int = 1):
    """The LM lm_eval's evaluator calls (lm_eval imported only here: it is an optional extra); chat: the
    run's ChatEncoder, for a fine-tuned model; forward, pipeline, rows: see Scorer."""
    try:
        from lm_eval.api.model import LM
    except ImportError:
        raise ImportError("tasks= needs lm-evaluation-harness: pip install 'lm_eval>=0.4'") from None

    class HarnessModel(LM):
        def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            return scorer.continuations([req.args for req in requests])

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            return scorer.rollings([req.args[0] for req in requests])

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            return scorer.untils([req.args for req in requests])

        def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
            return chat.render(chat_history, add_generation_prompt=add_generation_prompt)

        @property
        def tokenizer_name(self) -> str:  # lm-eval's cache key for rendered requests
            return chat.template_path if chat else str(tokenizer.path)

    scorer = Scorer(model, tokenizer, device, chat, forward, pipeline, rows)
    return HarnessModel()


class Scorer:
    """forward(windows (B, T)) -> logits (B, T, V): how the model is called, where it cannot be called as it is (the
    training model under TP, train/loop/downstream.py); None calls it as it is. rows: the continuations scored, or
    greedy requests generated, per forward (a forward of the training model under FSDP all-gathers every parameter,
    so one per request would be thousands of them). pipeline: under pipeline parallelism the step runner
    (train/parallel/pipeline.py PipelineRun), through whose schedule the windows are scored and generated from, a
    step's rows at a time (its token_scores and logits_at: the last stage's figures on every rank); its stages run
    windows of data.seq_len, so contexts are cut to that, not to the model's max_seq_len."""

    def __init__(self, model, tokenizer, device, chat=None, forward=None, pipeline=None, rows: int = 1):
        self.model, self.tok, self.device, self.chat = model, tokenizer, device, chat
        self.forward, self.pipeline = forward or model, pipeline
        self.rows = pipeline.rows if pipeline is not None else max(1, rows)  # a pipeline: a step's rows
        self.max_len = pipeline.seq_len if pipeline is not None else model.cfg.max_seq_len

    def ids(self, text: str) -> list[int]:
        """BOS + the text's ids; a chat context, rendered by the template, brings its own start."""
        return self.chat.encode_text(text) if self.chat else [self.tok.bos_id, *self.tok.encode(text)]

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """BOS + context ids, continuation ids: the whole text encoded at once, so the split falls where
        the tokenizer cuts it (a space ending the context moves to the continuation, as lm-eval's own
        Hugging Face model does)."""
        spaces = len(context) - len(context.rstrip())
        if spaces and not self.chat:  # a chat context ends with the template's generation prompt, kept whole
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, ctx = self.ids(context + continuation), self.ids(context)
        return ctx, whole[len(ctx):]

    @torch.no_grad()
    def batch_logprobs(self, asked: list[tuple[list[int], int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """For each (ids, n_scored) of `asked`: the log-probabilities (n_scored,) of the last n_scored of ids given
        those before them, and whether each is the greedy choice (ids longer than max_seq_len + 1 keep their end);
        all from one forward: the windows padded on the right to the longest (causal attention keeps a row's
        positions blind to what follows them); under a pipeline the rows of one step, padded to data.seq_len
        (PipelineRun.token_scores)."""
        kept = [ids[-(self.max_len + 1):] for ids, _ in asked]
        if self.pipeline is not None:
            return self.pipeline.token_scores([(torch.tensor(ids[:-1]), torch.tensor(ids[1:])[-n:])
                                               for ids, (_, n) in zip(kept, asked)])
        length = max(len(ids) for ids in kept) - 1
        windows = torch.tensor([ids[:-1] + [0] * (length + 1 - len(ids)) for ids in kept], device=self.device)
        logits = self.forward(windows)  # (B, T, V)
        out = []
        for row, (ids, (_, n)) in enumerate(zip(kept, asked)):
            scored = logits[row, :len(ids) - 1][-n:].float()  # (n, V)
            targets = torch.tensor(ids[1:], device=self.device)[-n:]  # (n,)
            logp = F.log_softmax(scored, dim=-1)
            out.append((logp.gather(1, targets[:, None])[:, 0], scored.argmax(-1) == targets))
        return out

    def continuations(self, pairs: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        """(log-likelihood, greedy) of each (context, continuation); an empty continuation is certain."""
        asked = [(ctx + cont, len(cont)) for ctx, cont in (self.encode_pair(*pair) for pair in pairs)]
        return [(float(logp.sum()), bool(greedy.all())) for logp, greedy in self.scored(asked)]

    def rollings(self, texts: list[str]) -> list[float]:
        """Each text's log-likelihood after BOS, in windows of max_seq_len predictions, each predicted token
        scored once with as much context as fits (lm-eval's rolling windows); the windows of every text go
        `rows` to a forward."""
        windows, owner, n = [], [], self.max_len
        for k, text in enumerate(texts):
            ids = [self.tok.bos_id, *self.tok.encode(text)]
            for first in range(1, len(ids), n):  # predicted positions [first, end)
                end = min(first + n, len(ids))
                windows.append((ids[max(0, end - 1 - n):end], end - first))
                owner.append(k)
        totals = [0.0] * len(texts)
        for k, (logp, _) in zip(owner, self.scored(windows)):  # each text's windows summed in their order
            totals[k] += float(logp.sum())
        return totals

    def scored(self, asked: list[tuple[list[int], int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """batch_logprobs of each of `asked`, `rows` to a forward, the longest first, as lm-eval's Hugging Face
        model orders them: a forward's windows are of about one length, little of it padding. A request that
        scores nothing needs no forward."""
        out = [(torch.zeros(0), torch.ones(0, dtype=torch.bool))] * len(asked)
        order = sorted((i for i, (_, n) in enumerate(asked) if n), key=lambda i: -len(asked[i][0]))
        for first in range(0, len(order), self.rows):
            batch = order[first:first + self.rows]
            for i, figures in zip(batch, self.batch_logprobs([asked[i] for i in batch])):
                out[i] = figures
        return out

    def untils(self, asked: list[tuple[str, dict]]) -> list[str]:
        """Greedy text after each (context, settings), cut at the first of settings["until"]: `rows` requests
        generated together (train/evaluation/greedy.py), the longest context first, as lm-eval orders them."""
        requests = [request(self.ids(context), settings) for context, settings in asked]
        ends = [self.tok.eos_id] + ([self.chat.turn_end_id()] if self.chat and self.chat.turn_end_id() else [])
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].ids))
        for first in range(0, len(order), self.rows):
            generate_together([requests[i] for i in order[first:first + self.rows]], self.next_tokens, self.max_len,
                              ends, self.tok.decode)
        return [r.answer() for r in requests]

    @torch.no_grad()
    def next_tokens(self, windows: list[list[int]]) -> list[int]:
        """The greedy token after each of windows (at most `rows`), from one forward: the windows padded on the
        right (to data.seq_len under a pipeline), each row's logits read at its own last position."""
        ends = [len(w) - 1 for w in windows]
        length = self.max_len if self.pipeline is not None else max(ends) + 1
        batch = torch.tensor([w + [0] * (length - len(w)) for w in windows], device=self.device)  # (B, length)
        if self.pipeline is not None:
            logits = self.pipeline.logits_at(batch, ends)  # (B, V)
        else:
            logits = self.forward(batch)[torch.arange(len(windows)), ends]  # (B, T, V) -> (B, V)
        return logits.float().argmax(-1).tolist()


def task_manager(tasks: list[str], task_dir: str | None, keys: tuple[str, str] = ("tasks", "task_dir")):
    """lm-eval's TaskManager over task_dir's YAMLs alone when they hold every task (indexing lm-eval's own ~10k
    YAMLs takes 5 to 30 s), else over its own tasks and task_dir's; once every task is found (else one line naming
    the first that is not; keys: how the command names tasks and task_dir)."""
    from lm_eval.tasks import TaskManager

    if task_dir:
        local = TaskManager(include_path=task_dir, include_defaults=False)
        if all(local.match_tasks([t]) for t in tasks):
            return local
    manager = TaskManager(include_path=task_dir) if task_dir else TaskManager()
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        where = f" or {task_dir}" if task_dir else f" (pass {keys[1]}=<folder of task YAMLs> for local ones)"
        raise ValueError(f"{keys[0]}={unknown[0]} is not a task of lm-eval{where}")
    return manager


def run_tasks(model, tokenizer, device, tasks: list[str], task_dir: str | None, limit: int | None,
              chat=None, forward=None, manager=None, pipeline=None, rows: int = 1) -> tuple[dict, list]:
    """lm-eval's tasks (names, or task YAMLs found in task_dir) on the model: ({task: {metric: value,
    "samples": n}}, per-request records {"task", "doc_id", "arguments", "loglikelihood", "target"}); chat: the
    run's ChatEncoder, which asks each context as a user turn of the template; forward, pipeline, rows: see Scorer;
    manager: the task_manager(tasks, task_dir) made before (made here when None)."""
    import lm_eval

    manager = manager or task_manager(tasks, task_dir)
    lm = harness_model(model, tokenizer, device, chat, forward, pipeline, rows)
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks,
                                  task_manager=manager, limit=limit, log_samples=True,
                                  apply_chat_template=chat is not None)
    table = {task: {**{k.split(",")[0]: v for k, v in figures.items() if k.split(",")[0] not in ("name", "alias")},
                    "samples": len(out["samples"].get(task, []))} for task, figures in out["results"].items()}
    return table, [request_record(task, s, i) for task, samples in out["samples"].items() for s in samples
                   for i in range(len(s["arguments"]))]


def request_record(task: str, sample: dict, i: int) -> dict:
    """One request of a sample: its arguments ((context, continuation) for a log-likelihood) and our answer
    (a log-likelihood, or the text generated)."""
    resp = sample["resps"][i][0]
    value = resp[0] if isinstance(resp, (tuple, list)) else resp
    return {"task": task, "doc_id": sample["doc_id"], "arguments": [str(a) for a in sample["arguments"][i]],
            "text" if isinstance(value, str) else "loglikelihood": value, "target": sample["target"]}


def format_tasks(table: dict) -> str:
    """task, metric, value: one line per metric of each task."""
    lines = [f"{'task':<32}  {'metric':<16}  {'value':>8}"]
    for task, figures in table.items():
        lines += [f"{task:<32}  {k:<16}  {v:>8.4f}" for k, v in figures.items() if isinstance(v, float)]
        lines.append(f"{task:<32}  {'samples':<16}  {figures['samples']:>8}")
    return "\n".join(lines)
