"""``JSONLDataModule``: user data as JSONL prompt/response lines, tokenized and validated up front."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prosg.data.loaders import SPLITS, BaseDataModule, ListDataset
from prosg.data.store import utf8_lines
from prosg.data.tasks import check_bucket_edges, default_bucket_edges, tokenizer_token_strs
from prosg.data.tokenizers import load_tokenizer
from prosg.errors import ConfigError, DataError


class JSONLDataModule(BaseDataModule):
    """User data: JSONL lines ``{"prompt": str, "response": str}``, read and validated at construction.

    Optional per-line fields: ``task`` (slice name, default ``"jsonl"``), ``answer_kind`` (0, 1 or 2
    for every response token; default 1 = scored as a local answer; 2 = prompt answer, distance =
    index in the response) and ``loss_weight`` (number >= 0, default 1). Prompts are
    ``<bos> prompt <sep>`` when the tokenizer has those ids and ``add_special_tokens``.
    ``max_prompt_len`` / ``max_response_len`` count tokens (prompt specials included); ``overlong:
    truncate`` keeps the head (prompt: head + ``<sep>``). ``empty_prompt: skip`` drops such lines.
    """

    def __init__(
        self,
        train_path: str,
        val_path: str | None = None,
        test_path: str | None = None,
        tokenizer: str | None = None,
        max_prompt_len: int = 1024,
        max_response_len: int = 1024,
        overlong: str = "error",
        empty_prompt: str = "error",
        batch_size: int = 8,
        num_workers: int = 0,
        add_special_tokens: bool = True,
        bucket_edges: list[int] | None = None,
        shuffle: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if overlong not in ("error", "truncate"):
            raise ConfigError(f"overlong={overlong!r}; use 'error' or 'truncate'")
        if empty_prompt not in ("error", "skip"):
            raise ConfigError(f"empty_prompt={empty_prompt!r}; use 'error' or 'skip'")
        if max_prompt_len < 3 or max_response_len < 1:
            raise ConfigError(
                f"max_prompt_len={max_prompt_len} must be >= 3 and max_response_len={max_response_len} >= 1"
            )
        if batch_size < 1 or num_workers < 0:
            raise ConfigError(f"batch_size={batch_size} must be >= 1 and num_workers={num_workers} >= 0")
        self.paths = {"train": train_path, "val": val_path, "test": test_path}
        self.tokenizer_spec = tokenizer
        self.tokenizer = load_tokenizer(tokenizer)
        self.max_prompt_len, self.max_response_len = max_prompt_len, max_response_len
        self.overlong, self.empty_prompt = overlong, empty_prompt
        self.batch_size, self.num_workers, self.shuffle = batch_size, num_workers, shuffle
        self.add_special_tokens = add_special_tokens
        self.vocab_size: int = int(self.tokenizer.vocab_size)
        self.pad_id: int = int(getattr(self.tokenizer, "pad_id", None) or 0)
        self.max_len: int = max_prompt_len + max_response_len
        self.bucket_edges: list[int] = (
            check_bucket_edges(bucket_edges) if bucket_edges is not None else default_bucket_edges(max_response_len)
        )
        self.skipped: dict[str, int] = {}
        # Every configured split is read now, so the per-line task names (and the n_facts slices) are
        # final at construction, when a LightningCLI links them to the model.
        self._data: dict[str, list[dict[str, Any]]] = {s: self._read(s) for s in self.split_names()}
        self.tasks: list[str] = list(dict.fromkeys(ex["task"] for exs in self._data.values() for ex in exs))

    def setup(self, stage: str | None = None) -> None:
        self._warn_uneven({s: len(v) for s, v in self._data.items()})

    def dataset(self, split: str) -> ListDataset:
        if self.paths[split] is None:
            raise ConfigError(f"no {split}_path configured for JSONLDataModule; set {split}_path: to a .jsonl file")
        return ListDataset(self._data[split])

    def split_names(self) -> list[str]:
        return [s for s in SPLITS if self.paths[s] is not None]

    def _read(self, split: str) -> list[dict[str, Any]]:
        path = Path(self.paths[split])
        if not path.is_file():
            raise DataError(f"{split}_path {str(path)!r} does not exist; point {split}_path at a JSONL file")
        out: list[dict[str, Any]] = []
        skipped = 0
        for lineno, line in utf8_lines(path):
            if not line.strip():
                continue
            ex = self._parse_line(path, lineno, line, index=len(out))
            if ex is None:
                skipped += 1
            else:
                out.append(ex)
        if not out:
            raise DataError(
                f"{path}: no usable examples ({skipped} skipped); add lines {{\"prompt\": ..., \"response\": ...}}"
            )
        self.skipped[split] = skipped
        return out

    def _parse_line(self, path: Path, lineno: int, line: str, index: int) -> dict[str, Any] | None:
        where = f"{path}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{where}: bad JSON ({e.msg} at column {e.colno}); each line must be one JSON object"
            ) from None
        if not isinstance(rec, dict):
            raise DataError(
                f"{where}: expected a JSON object {{\"prompt\": ..., \"response\": ...}}, got {type(rec).__name__}"
            )
        for key in ("prompt", "response"):
            if key not in rec:
                raise DataError(f"{where}: missing key {key!r}; each line needs \"prompt\" and \"response\" strings")
            if not isinstance(rec[key], str):
                raise DataError(f"{where}: {key!r} must be a string, got {type(rec[key]).__name__}")
        task = rec.get("task", "jsonl")
        kind = rec.get("answer_kind", 1)
        weight = rec.get("loss_weight", 1.0)
        if not isinstance(task, str) or not task:
            raise DataError(f"{where}: optional 'task' must be a non-empty string, got {task!r}")
        if kind not in (0, 1, 2) or isinstance(kind, bool):
            raise DataError(f"{where}: optional 'answer_kind' must be 0, 1 or 2, got {kind!r}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise DataError(f"{where}: optional 'loss_weight' must be a number >= 0, got {weight!r}")
        if not rec["prompt"].strip():
            if self.empty_prompt == "skip":
                return None
            raise DataError(f"{where}: empty prompt; fill it in, or set empty_prompt: skip to drop such lines")
        if not rec["response"]:
            raise DataError(f"{where}: empty response, nothing to score; remove the line or give it a response")

        tok = self.tokenizer
        bos = getattr(tok, "bos_id", None) if self.add_special_tokens else None
        sep = getattr(tok, "sep_id", None) if self.add_special_tokens else None
        body = tok.encode(rec["prompt"])
        prompt = ([bos] if bos is not None else []) + body + ([sep] if sep is not None else [])
        response = tok.encode(rec["response"])
        if len(prompt) > self.max_prompt_len:
            if self.overlong == "error":
                raise DataError(
                    f"{where}: prompt is {len(prompt)} tokens, over max_prompt_len={self.max_prompt_len}; "
                    "raise max_prompt_len or set overlong: truncate"
                )
            keep = self.max_prompt_len - (sep is not None)
            prompt = prompt[:keep] + ([sep] if sep is not None else [])
        if len(response) > self.max_response_len:
            if self.overlong == "error":
                raise DataError(
                    f"{where}: response is {len(response)} tokens, over max_response_len={self.max_response_len}; "
                    "raise max_response_len or set overlong: truncate"
                )
            response = response[: self.max_response_len]
        r = len(response)
        return {
            "prompt_ids": prompt,
            "response_ids": response,
            "answer_kind": [kind] * r,
            "distance": list(range(r)) if kind == 2 else [-1] * r,
            "loss_weight": [float(weight)] * r,
            "task": task,
            "n_facts": 0,
            "meta": {"source": str(path), "line": lineno, "index": index},
        }

    def dataset_info(self) -> dict[str, Any]:
        return {
            "source": "jsonl",
            "paths": self.paths,
            "tokenizer": self.tokenizer_spec,
            "vocab_size": self.vocab_size,
            "pad_id": self.pad_id,
            "bucket_edges": self.bucket_edges,
            "max_len": self.max_len,
            "tasks": self.tasks,
        }

    def decode_tokens(self, example: dict[str, Any], ids: list[int]) -> tuple[list[str], str]:
        return tokenizer_token_strs(self.tokenizer, ids), ""
