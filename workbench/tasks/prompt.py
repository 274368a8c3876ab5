"""A one-prompt task typed by a user (the dashboard's prompt explorer, notebooks).

Text is tokenized by the model; a model without a tokenizer takes space-separated token ids.
Without a corrupted prompt the clean one stands in (methods that contrast the two then see no
difference); without answers, the model's own top two next-token predictions are used, so
logit lens and DLA explain the model's choice against its runner-up.
"""

from __future__ import annotations

import torch

from workbench.errors import WorkbenchError
from workbench.tasks.base import Task, pad_id, validate


def _ids(model, text: str, what: str) -> list[int]:
    if model.tokenizer is not None:
        ids = model.to_tokens(text)
    else:
        try:
            ids = [int(t) for t in text.split()]
        except ValueError:
            raise WorkbenchError(f"model '{model.name}' has no tokenizer: give the {what} prompt as space-separated token ids") from None
    if not ids:
        raise WorkbenchError(f"the {what} prompt is empty")
    return ids


def _answer(model, text: str) -> int:
    if model.tokenizer is not None:
        return model.single_token(text)
    try:
        return int(text)
    except ValueError:
        raise WorkbenchError(f"model '{model.name}' has no tokenizer: give answers as token ids") from None


def prompt_task(model, clean: str, corrupted: str | None = None, answer: str | None = None, wrong: str | None = None) -> Task:
    clean_ids = _ids(model, clean, "clean")
    corrupt_ids = _ids(model, corrupted, "corrupted") if corrupted else list(clean_ids)
    if answer is None or wrong is None:
        with torch.no_grad():
            top2 = model.tl(torch.tensor([clean_ids], device=model.device))[0, -1].topk(2).indices.tolist()
        answer_id = _answer(model, answer) if answer is not None else top2[0]
        wrong_id = _answer(model, wrong) if wrong is not None else next(t for t in top2 if t != answer_id)
    else:
        answer_id, wrong_id = _answer(model, answer), _answer(model, wrong)
    if answer_id == wrong_id:
        raise WorkbenchError("the answer and the wrong answer are the same token; give two different ones")
    params = {k: v for k, v in (("clean", clean), ("corrupted", corrupted), ("answer", answer), ("wrong", wrong)) if v}
    task = Task("prompt", params, [clean_ids], [corrupt_ids], [answer_id], [wrong_id], [dict(text=clean)], pad_id(model))
    return validate(task, model)
