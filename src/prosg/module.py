"""The LightningModule: a backbone, a method (plain, JRT, soft prompt, ProSG, ...), loss and metrics.

One module covers every method in the comparison, so they share data, loss, optimiser and metrics;
what differs between them lives behind the ``Method`` seam (``prosg.methods``). The DataModule's
facts (vocabulary, padding, metric slices, distance buckets) arrive as linked arguments.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from prosg.backbones.base import Backbone
from prosg.backbones.registry import from_pretrained
from prosg.data.collate import POSITION_FIELDS
from prosg.errors import ConfigError, ProSGError
from prosg.generate import generate
from prosg.methods import Method, MethodOutput, Plain
from prosg.metrics import ForgettingMetrics


class ProSGModule(L.LightningModule):
    """Backbone + method trained on response tokens, scored by forgetting metrics.

    ``backbone`` is a factory called with the data's vocabulary size (what a ``class_path``
    config without ``vocab_size`` becomes) or an already-built ``Backbone``; ``pretrained`` is a
    local checkpoint path instead. ``method`` defaults to the plain backbone. The DataModule's
    ``vocab_size``, ``pad_id`` and metric facts (``eval_buckets`` = its distance ``bucket_edges``,
    ``eval_tasks`` = task names, ``eval_n_facts`` = n_facts slice labels) are linked by the CLI;
    give them yourself when building the module in Python (without ``eval_buckets`` the module
    trains but cannot evaluate).
    """

    def __init__(
        self,
        backbone: Callable[[int], Backbone] | None = None,
        pretrained: str | None = None,
        method: Method | None = None,
        freeze_backbone: bool | None = None,
        lr: float = 1e-3,
        lr_backbone: float | None = None,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 0,
        schedule: str = "cosine",
        min_lr_ratio: float = 0.1,
        generation_eval: bool = True,
        vocab_size: int | None = None,
        pad_id: int = 0,
        eval_buckets: Sequence[int] | None = None,
        eval_tasks: Sequence[str] | None = None,
        eval_n_facts: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        # Under the CLI (and load_from_checkpoint) these are the class_path configs, so a checkpoint
        # rebuilds its model; Lightning's warning about module-valued arguments does not apply to them.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*is an instance of `nn.Module`")
            self.save_hyperparameters()
        if (backbone is None) == (pretrained is None):
            raise ConfigError("give exactly one of model.backbone (a class_path config) or model.pretrained (a checkpoint path)")
        if schedule not in ("cosine", "constant"):
            raise ConfigError(f"model.schedule={schedule!r}; choose 'cosine' or 'constant'")
        if isinstance(backbone, Backbone):
            self.backbone = backbone
        elif backbone is not None:  # a factory (class_path config) that still needs the vocabulary size
            if vocab_size is None:
                raise ConfigError("model.vocab_size is unset: use a ProSG DataModule (it is linked) or set it explicitly")
            self.backbone = backbone(vocab_size)
        else:
            self.backbone = from_pretrained(pretrained)
        if vocab_size is not None and vocab_size > self.backbone.vocab_size:
            raise ConfigError(
                f"the data has {vocab_size} token ids but the backbone's vocabulary is {self.backbone.vocab_size}; "
                "build the backbone with a larger vocab_size or use its own tokenizer"
            )
        self.method = method if method is not None else Plain()
        self.method.attach(self.backbone)
        if freeze_backbone is None:
            freeze_backbone = self.method.freezes_backbone
        if self.method.needs_frozen_backbone and not freeze_backbone:
            raise ConfigError(
                f"{self.method.name} trains only its own parameters; leave model.freeze_backbone unset or true"
            )
        self.backbone.requires_grad_(not freeze_backbone)
        self.pad_id = int(pad_id)
        self.metrics: ForgettingMetrics | None = None
        self.gen_metrics: ForgettingMetrics | None = None
        if eval_buckets is not None:
            slices = (list(eval_tasks or ["all"]), list(eval_n_facts or [0]))
            self.metrics = ForgettingMetrics(eval_buckets, *slices)
            self.gen_metrics = ForgettingMetrics(eval_buckets, *slices)
        self._gen_updated = False

    # -- forward ---------------------------------------------------------------------------
    def forward(self, batch: dict) -> MethodOutput:
        """Teacher-forced logits (B, T, V) of a batch already prepared by the method, plus its aux losses."""
        return self.method(batch)

    def loss(self, batch: dict, logits: Tensor) -> Tensor:
        """Weighted next-token cross-entropy over the response (logits at t-1 predict token t)."""
        w = batch["loss_weight"][:, 1:].to(logits.dtype)
        nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), batch["input_ids"][:, 1:], reduction="none")
        return (nll * w).sum() / w.sum().clamp(min=1e-8)

    # -- steps -----------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        batch = self.method.prepare(batch, self.pad_id)
        out = self(batch)
        loss = self.loss(batch, out.logits)
        n = len(batch["task"])
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        for name, term in out.aux.items():
            self.log(f"train/{name}", term, batch_size=n)
            loss = loss + term
        if not torch.isfinite(loss):
            raise ProSGError(
                f"loss became {loss.item()} at global step {self.global_step} (batch {batch_idx}). Likely causes: "
                "a learning rate too high for this model (lower model.lr / model.lr_backbone), an SG step size η "
                "that diverged (set the method's eta_clip), or fp16 overflow (use bf16 or 32-true precision)."
            )
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        self.method.on_before_optimizer_step()
        # the learning rate of every parameter group (head / backbone) at this step, in whatever logger is set
        for i, group in enumerate(optimizer.param_groups):
            self.log(f"lr-{group.get('name', i)}", float(group["lr"]), on_step=True, on_epoch=False)

    def _eval_step(self, batch: dict, prefix: str) -> None:
        if self.metrics is None:
            raise ConfigError(
                "evaluation needs model.eval_buckets (and the slices): use a ProSG DataModule, which links them, "
                "or pass eval_buckets/eval_tasks/eval_n_facts when building ProSGModule in Python"
            )
        batch = self.method.prepare(batch, self.pad_id)
        logits = self(batch).logits
        self.log(f"{prefix}/loss", self.loss(batch, logits), batch_size=len(batch["task"]), sync_dist=True)
        self.metrics.update(batch, logits)
        if self.hparams.generation_eval:
            self._generation_update(batch)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, Tensor]:
        """Teacher-forced next-token predictions: ``pred[:, t]`` is the model's guess for token t."""
        batch = self.method.prepare(batch, self.pad_id)
        logits = self(batch).logits
        pred = torch.cat([torch.full_like(batch["input_ids"][:, :1], -1), logits[:, :-1].argmax(-1)], dim=1)
        return {"index": batch["index"], "pred": pred, "correct": pred == batch["input_ids"],
                "answer_kind": batch["answer_kind"], "distance": batch["distance"]}

    def _generation_update(self, batch: dict) -> None:
        """Free-running accuracy where a prompt answer spans several tokens (copy, instruction names).

        The prompt is read as the prompt (the method's own way), the response up to the first prompt
        answer is teacher-forced, and from there the model writes the answers itself (greedy), so
        each answer token follows the model's own earlier ones; scored like teacher-forced tokens.
        """
        kind = batch["answer_kind"]
        rows = [i for i, t in enumerate(batch["task"]) if t in ("copy", "instruction") and bool((kind[i] == 2).any())]
        if not rows:
            return
        plen = batch["prompt_len"]
        first = {i: int((kind[i] == 2).nonzero()[0]) for i in rows}  # first prompt answer (absolute position)
        last = {i: int((kind[i] == 2).nonzero()[-1]) for i in rows}
        for key in sorted({(int(plen[i]), first[i]) for i in rows}):
            group = [i for i in rows if (int(plen[i]), first[i]) == key]
            p, f = key
            ids = batch["input_ids"][group]
            n_new = max(last[i] for i in group) - f + 1
            new = generate(self.method, ids[:, :p], n_new, forced=ids[:, p:f], answers=batch["candidates"][group])
            # score generated tokens like teacher-forced ones: the "logits" are one-hot picks
            picks = torch.cat([ids[:, :f], new], dim=1)
            onehot = F.one_hot(picks, self.backbone.vocab_size).to(torch.float32)
            sub = {k: (v[group] if isinstance(v, Tensor) else [v[i] for i in group]) for k, v in batch.items()}
            # per-position fields are cut to the generated length (by name: a (B, K) field may have K == T)
            sub = {k: (v[:, : picks.shape[1]] if k in POSITION_FIELDS else v) for k, v in sub.items()}
            self.gen_metrics.update(sub, torch.cat([onehot[:, 1:], onehot[:, -1:]], dim=1))
            self._gen_updated = True

    def _log_metrics(self, prefix: str) -> None:
        # compute() already all-reduced the states; sync_dist only tells Lightning so (no second reduction
        # of equal values changes them)
        self.log_dict({f"{prefix}/{k}": v for k, v in self.metrics.compute().items()}, sync_dist=True)
        self.metrics.reset()
        if self._gen_updated:  # free-running scores; perplexity of one-hot picks means nothing
            gen = {f"{prefix}/gen/{k}": v for k, v in self.gen_metrics.compute().items() if k != "ppl"}
            self.log_dict(gen, sync_dist=True)
            self.gen_metrics.reset()
            self._gen_updated = False

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["prosg_method"] = type(self.method).__name__
        checkpoint["prosg_method_state"] = self.method.extra_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse, with the fix, a checkpoint whose method does not match this config."""
        keys = checkpoint.get("state_dict", {}).keys()
        saved = checkpoint.get("prosg_method")
        mine = type(self.method).__name__
        own = {k for k in self.state_dict() if k.startswith("method.")}
        theirs = {k for k in keys if k.startswith("method.")}
        if (saved is not None and saved != mine) or own != theirs:
            raise ConfigError(
                f"the checkpoint was trained with method {saved or 'with other method parameters'} but this config "
                f"builds {mine}; run with the config saved beside the checkpoint (config.yaml in the run "
                "directory) or set model.method to match"
            )
        self.method.load_extra_state(checkpoint.get("prosg_method_state", {}))

    def configure_optimizers(self) -> Any:
        head_params = [p for p in self.method.parameters() if p.requires_grad]
        backbone_params = [p for p in self.backbone.parameters() if p.requires_grad]
        lr = self.hparams.lr
        groups = []
        if head_params:
            groups.append({"params": head_params, "lr": lr, "name": "head"})
        if backbone_params:
            groups.append({"params": backbone_params, "lr": self.hparams.lr_backbone or lr, "name": "backbone"})
        if not groups:
            if self._trainer is not None and self.trainer.max_steps == 0:
                return None  # evaluation only (a frozen backbone with a parameter-free method): nothing to optimise
            raise ConfigError(
                f"nothing to train: the backbone is frozen and {self.method.name} has no parameters; unfreeze it "
                "(model.freeze_backbone: false), or evaluate as is with trainer.max_steps: 0"
            )
        opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(self.hparams.betas), weight_decay=self.hparams.weight_decay)
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 1
        warm, floor, cosine = self.hparams.warmup_steps, self.hparams.min_lr_ratio, self.hparams.schedule == "cosine"

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            if not cosine or not math.isfinite(total) or total <= warm:
                return 1.0
            progress = min(1.0, (step - warm) / max(1, total - warm))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
