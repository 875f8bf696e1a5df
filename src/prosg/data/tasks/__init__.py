"""Constructed prompt-forgetting tasks: procedural, seeded, deterministic.

Example ``i`` of a split is generated from ``np.random.default_rng([seed, split_id, i])`` alone, so
the same (seed, split, i) gives the same example on any machine, worker count or DDP layout; no RNG
is shared between examples. Each task is a small dataclass config validated at construction
(``ConfigError`` names the knob and the fix). ``Task.generate(rng)`` returns an example in the
batch contract (see ``prosg.data.collate``):

    prompt_ids, response_ids: list[int]
    answer_kind: list[int]   0 = not scored, 1 = local answer, 2 = prompt answer  (len R)
    distance:    list[int]   index in the response for prompt answers, -1 elsewhere (len R)
    loss_weight: list[float] cross-entropy weight for predicting this response token (len R)
    task: str, n_facts: int, meta: dict

Synthetic token vocabulary (``recall``, ``copy``): ids 0..4 are specials (``<pad> <bos> <sep>
<set> <ask>``), then the task's symbols (keys then values for recall). ``instruction`` is text,
tokenized by ``ByteTokenizer`` (ids 0..259, pad 256), and so is ``text`` (windows of English prose
from ``prosg.data.corpus``, no prompt answers: for pretraining language models).

One module per task (``base`` holds what they share). A new task is a module with a
``@register_task`` ``Task`` dataclass (``ByteTask`` for a text task tokenized as bytes), plus its
import line below.
"""

from prosg.data.tasks.base import (
    ASK,
    BOS,
    GENERATOR_VERSION,
    N_SPECIAL,
    PAD,
    SEP,
    SET,
    SPECIAL_NAMES,
    SPLIT_IDS,
    TASKS,
    ByteTask,
    Task,
    byte_token_strs,
    check_bucket_edges,
    default_bucket_edges,
    example_rng,
    generate_example,
    make_task,
    register_task,
    tokenizer_token_strs,
)
from prosg.data.tasks.copy import CopyTask
from prosg.data.tasks.instruction import InstructionTask
from prosg.data.tasks.recall import RecallTask
from prosg.data.tasks.text import TextTask

__all__ = [
    "ASK", "BOS", "GENERATOR_VERSION", "N_SPECIAL", "PAD", "SEP", "SET", "SPECIAL_NAMES", "SPLIT_IDS", "TASKS",
    "ByteTask", "Task", "byte_token_strs", "check_bucket_edges", "default_bucket_edges", "example_rng", "generate_example",
    "make_task", "register_task", "tokenizer_token_strs", "CopyTask", "InstructionTask", "RecallTask", "TextTask",
]
